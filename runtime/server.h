// `moesh serve`: the ZeroMQ ROUTER front of the Scheduler (protocol:
// docs/PROTOCOL.md, transport/protocol.h). One thread polls the socket and
// steps the scheduler: requests are parsed and checked, tokenized (prompt text,
// or chat messages through the model's chat template) and queued; every step's
// tokens go out as frames as soon as they are sampled; cancel and ping are
// answered between steps. The socket is ROUTER_MANDATORY with bounded
// high-water marks: a reply that cannot be delivered (the client went away, or
// stopped reading) cancels its request at once, frees its KV blocks and is
// counted — never dropped silently. In-process clients (the HTTP front,
// transport/http_server.h) reach the same loop through a LocalPort, with the
// same frames; metrics_text() is what GET /metrics shows.
//
//   Server srv(model, backend, tokenizer, chat, rc.server, rc.max_batch, rc.kv_block_size, rc.kv_type);
//   srv.bind();                         // throws moesh::Error (address in use, bad endpoint)
//   srv.attach(port);                   // optional: the HTTP front's port
//   srv.run(stop_flag);                 // until stop_flag, then drains (drain_timeout_s)
//
// Thread safety: run() on one thread; the stop flag from any thread or a signal handler.
#pragma once

#include "runtime/chat_template.h"
#include "runtime/model.h"
#include "runtime/run_config.h"
#include "runtime/scheduler.h"
#include "runtime/tokenizer.h"
#include "transport/local_port.h"
#include "transport/protocol.h"

#include <atomic>
#include <functional>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace zmq {
class context_t;
class socket_t;
} // namespace zmq

namespace moesh {
namespace security {
class ZapHandler;
}

struct ServerStats {
    int64_t requests = 0, completed = 0, cancelled = 0, rejected = 0, busy = 0, bad_requests = 0;
    int64_t undeliverable = 0;   // replies the socket refused (client gone or not reading)
    int64_t tokens_out = 0, prompt_tokens = 0;
};

// Cumulative histogram in Prometheus' shape: counts per upper bound, sum, count.
class Histogram {
public:
    explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}
    void observe(double v);
    void write(std::string & out, const char * name, const char * help) const;

private:
    std::vector<double> bounds_;
    std::vector<int64_t> counts_;   // per bucket (not cumulative); the last is +Inf
    double sum_ = 0;
    int64_t count_ = 0;
};

class Server {
public:
    // tokenizer may be null (then only prompt_ids are accepted); chat: the model's template
    // for "messages" (without it they are refused). weights may be null.
    Server(const Model & model, Backend & backend, const Tokenizer * tokenizer, std::optional<ChatTemplate> chat,
           const ServerConfig & config, int64_t max_batch, int64_t kv_block_size, int32_t kv_type = MOESH_DTYPE_F32,
           const BackendWeights * weights = nullptr,
           std::string model_name = "");
    ~Server();

    // CURVE on the ZeroMQ endpoint (before bind()): the server's secret key (Z85) and, when not
    // empty, the only client public keys let in (transport/security.h).
    void set_curve(std::string secret_key_z85, std::vector<std::string> authorized_z85);
    // After bind(): a new list of client keys (empty: any client with the server's key).
    void set_curve_clients(const std::vector<std::string> & authorized_z85);
    // run() calls reload() on its own thread, between steps, whenever *flag was set (SIGHUP).
    void set_reload(std::atomic<bool> * flag, std::function<void()> reload);
    void bind();                                   // the endpoint actually bound: endpoint()
    const std::string & endpoint() const { return bound_; }
    // Serves until stop is set, then refuses new requests ("shutting_down"), lets running ones
    // finish for at most drain_timeout_s, cancels the rest, and returns.
    void run(const std::atomic<bool> & stop);

    // In-process clients through port (kept until the server is destroyed): served by run()
    // beside the socket; run() also publishes the port's state and queue fill.
    void attach(LocalPort & port);
    // Routed experts from a store or gpu tier (ForwardPass::set_placement); /metrics reports them.
    void set_placement(const ExpertPlacement & p);

    const ServerStats & stats() const { return stats_; }
    const Scheduler & scheduler() const { return *sched_; }
    std::string metrics_text() const;   // Prometheus text format 0.0.4

private:
    struct Origin {            // who sent a request, and so where its replies go
        std::string peer;      // ZeroMQ routing id (empty for an in-process client)
        uint64_t local = 0;    // LocalPort client (0 for a ZeroMQ peer)
        bool delim = false;    // the ZeroMQ client sent [empty, body]: replies get the empty frame too
        bool operator==(const Origin & o) const { return peer == o.peer && local == o.local; }
    };
    struct Active {
        Origin origin;
        std::string id;        // the client's request id
        bool stream = false;
        std::vector<std::string> stop;
        std::string text;      // decoded so far (stop strings, final text)
        std::unique_ptr<StreamDecoder> decoder;
        int64_t prompt_tokens = 0;
        int64_t index = 0;
        int64_t max_tokens = 0;
        bool gone = false;     // a reply was undeliverable
        std::chrono::steady_clock::time_point last_token;   // inter-token latency
        bool any_token = false;
        size_t sent = 0;       // bytes of the answer's text already in token frames
        std::optional<int32_t> pending;   // the last token, its frame not sent yet (see on_token)
        bool logprobs = false;                   // the request asked for them: one per token in order
        std::vector<protocol::Logprobs> token_logprobs;
        bool chat = false;                       // messages: the chat template's end-of-turn tokens end it
        bool scoring = false, echo = false;      // prompt_logprobs, echo
        std::vector<int32_t> prompt;             // when scoring
        std::vector<protocol::Logprobs> prompt_logprobs;   // scoring: one per prompt token so far
        std::string prompt_text;                 // echo
        std::shared_ptr<GrammarMatcher> grammar; // the request's, to say why it stopped it
        ToolCallFormat tool_format = ToolCallFormat::None;   // the request gave tools: calls are read from the text
        std::string tools;                                     // ... and these (JSON) type the XML formats' values
        bool reasoning = false;        // the chat template reasons: <think> blocks are split from the answer
        bool reasoning_open = false;   // ... and its prompt opened one
        bool harmony = false;          // gpt-oss' channels: analysis is the reasoning, final the answer
        size_t reasoning_sent = 0;     // bytes of reasoning already in token frames (sent: of the answer)
        std::vector<PartialCall> calls_sent;   // streaming: each call as far as token frames carried it
        std::vector<std::string> call_ids;     // ... and its id, which the done frame keeps
        bool calls_diverged = false;           // the calls stopped reading as they were sent (or grew too large): no more deltas
        // Reading the calls again costs more as they grow (a file's content as an argument): see call_deltas.
        std::chrono::steady_clock::time_point calls_read_at{};
        std::chrono::nanoseconds calls_read_cost{};   // the last read's CPU time
    };

    void handle(const Origin & from, const std::string & body, bool draining);
    void generate(const Origin & from, protocol::Request && req);
    bool send(const Origin & to, const std::string & frame);   // false: undeliverable
    void take_local(bool draining);   // the port's waiting messages
    // The text as the client sees it: reasoning (when the template reasons) and answer, with how
    // much of each is certain enough to stream.
    // Views into the request's text, or into the view's own buffers where the parts had to be
    // rebuilt (harmony's channels, the text before tool calls): filled in place, never copied.
    struct OutputView {
        OutputView() = default;
        OutputView(const OutputView &) = delete;
        OutputView & operator=(const OutputView &) = delete;
        bool reasoned = false;
        std::string_view reasoning, content;
        size_t reasoning_safe = 0, content_safe = 0;
        std::string_view calls_text;   // the certain text tool calls are read from (when the request has tools)
        std::string own_reasoning, own_content;
    };
    void view(const Active & a, size_t hold, bool final, OutputView & v) const;
    void send_pending(uint64_t handle, Active & a, const OutputView & v);   // the held token frame, the certain text
    // What the certain text adds to the calls being written, since the last frame.
    void call_deltas(Active & a, std::string_view text, std::vector<protocol::ToolCallDelta> & out);
    bool on_token(uint64_t handle, int32_t token, const TokenLogprobs * lp);
    protocol::TokenLogprob token_logprob(int32_t token, float logprob) const;
    protocol::Logprobs logprobs_entry(int32_t token, const TokenLogprobs * lp) const;   // lp null: logprob unknown
    void on_done(uint64_t handle, FinishReason why, const std::vector<int32_t> & tokens, const RequestTimings & t);
    // The request's grammar (grammar or json_schema), compiled or from the cache; null and *why
    // when it is invalid.
    std::shared_ptr<const Grammar> request_grammar(const protocol::Request & req, std::string * why);
    std::shared_ptr<const Grammar> compile_grammar(const std::string & text, std::string * why);   // cached
    std::string new_call_id();
    static nlohmann::ordered_json template_messages(const std::vector<protocol::ChatMessage> & messages);

    const Model & model_;
    const Tokenizer * tok_;
    std::optional<ChatTemplate> chat_;
    std::vector<int32_t> chat_stop_;   // end-of-turn tokens of the chat template
    ServerConfig cfg_;
    std::string model_name_;
    protocol::Limits limits_;
    std::unique_ptr<Scheduler> sched_;
    std::unique_ptr<zmq::context_t> ctx_;
    std::unique_ptr<security::ZapHandler> zap_;   // after ctx_, before sock_: closed between them
    std::unique_ptr<zmq::socket_t> sock_;
    std::string curve_secret_;
    std::vector<std::string> curve_clients_;
    std::atomic<bool> * reload_flag_ = nullptr;
    std::function<void()> reload_;
    std::string bound_;
    std::map<uint64_t, Active> active_;
    std::vector<uint64_t> to_cancel_;   // undeliverable: cancelled after the step
    // The status line every log_interval_s while there is work (stderr): counters at the last one.
    void log_status(double seconds);
    SchedulerStats logged_;
    int64_t logged_tokens_out_ = 0;
    std::vector<int32_t> eos_;
    std::shared_ptr<const GrammarVocab> grammar_vocab_;   // built at the first grammar
    // The last grammars compiled, most recent first: requests often repeat a schema.
    std::vector<std::pair<std::string, std::shared_ptr<const Grammar>>> grammars_;
    std::mt19937_64 call_ids_{std::random_device{}()};   // ids of the tool calls models make
    size_t max_stop_bytes_ = 0;
    ServerStats stats_;
    LocalPort * port_ = nullptr;
    std::vector<LocalPort::Message> inbox_;
    const ExpertStore * store_ = nullptr;
    const DeviceExperts * gpu_ = nullptr;
    std::vector<int64_t> expert_load_;   // [n_layer * n_expert]: tokens routed to each expert
    Histogram ttft_{{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
    Histogram itl_{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}};
    Histogram duration_{{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}};
    Histogram queue_{{0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30}};
    Histogram step_seconds_{{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
    Histogram step_tokens_{{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}};
};

} // namespace moesh
