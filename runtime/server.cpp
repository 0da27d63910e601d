#include "runtime/server.h"

#include "experts/device_experts.h"
#include "experts/expert_store.h"
#include "runtime/error.h"
#include "runtime/json_schema.h"
#include "runtime/reasoning.h"
#include "runtime/tool_calls.h"
#include "transport/security.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>

namespace moesh {

using protocol::ErrorCode;
using protocol::done_frame;
using protocol::error_frame;
using protocol::pong_frame;
using protocol::token_frame;

Server::Server(const Model & model, Backend & backend, const Tokenizer * tokenizer, std::optional<ChatTemplate> chat,
               const ServerConfig & config, int64_t max_batch, int64_t kv_block_size, int32_t kv_type, const BackendWeights * weights,
               std::string model_name)
    : model_(model), tok_(tokenizer), chat_(std::move(chat)), cfg_(config), model_name_(std::move(model_name)) {
    const ModelConfig & c = model.config();
    SchedulerOptions so;
    so.max_batch = max_batch;
    so.max_sequences = config.max_sequences;
    so.kv_block_size = kv_block_size;
    so.kv_type = kv_type;
    so.kv_blocks = KvCacheSpec::blocks_for_budget(config.kv_cache, c.n_layer, c.n_head_kv, c.head_dim, so.kv_block_size,
                                                  so.kv_type);
    if (so.kv_blocks < 1)
        throw Error("[server] kv_cache = " + std::to_string(config.kv_cache) + " bytes holds no KV block of this model; raise it");
    so.prefill_chunk = config.prefill_chunk;
    so.prefix_cache = config.prefix_cache;
    so.kv_allocation = config.kv_up_front ? KvAllocation::UpFront : KvAllocation::OnDemand;
    so.max_queue = config.max_queue;
    sched_ = std::make_unique<Scheduler>(model, backend, so, weights);
    limits_.max_message_bytes = config.max_message_bytes;
    limits_.max_tokens = config.max_tokens;
    limits_.n_vocab = c.n_vocab;
    max_stop_bytes_ = size_t(limits_.max_stop_bytes);
    for (int64_t id : c.eos_token_ids) eos_.push_back(int32_t(id));
    if (c.n_expert > 0) {
        expert_load_.assign(size_t(c.n_layer * c.n_expert), 0);
        const int64_t n_used = c.n_expert_used, n_expert = c.n_expert;
        sched_->forward().set_route_observer([this, n_used, n_expert](int64_t layer, int64_t n, const int32_t * ids, const float *) {
            int64_t * row = expert_load_.data() + layer * n_expert;
            for (int64_t i = 0; i < n * n_used; ++i) ++row[ids[i]];
        });
    }
    if (tok_ && chat_) chat_stop_ = chat_stop_ids(*tok_);
}

Server::~Server() = default;

void Server::set_curve(std::string secret_key_z85, std::vector<std::string> authorized_z85) {
    curve_secret_ = std::move(secret_key_z85);
    curve_clients_ = std::move(authorized_z85);
}

void Server::set_curve_clients(const std::vector<std::string> & authorized_z85) {
    if (zap_) zap_->set_allowed(authorized_z85);
}

void Server::set_reload(std::atomic<bool> * flag, std::function<void()> reload) {
    reload_flag_ = flag;
    reload_ = std::move(reload);
}

void Server::bind() {
    ctx_ = std::make_unique<zmq::context_t>(1);
    // With CURVE always, so that a reload can start or change a list of client keys.
    if (!curve_secret_.empty())
        zap_ = std::make_unique<security::ZapHandler>(*ctx_, curve_clients_, [](const std::string & what) {
            std::fprintf(stderr, "moesh: %s\n", what.c_str());
        });
    sock_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::router);
    if (!curve_secret_.empty()) {
        sock_->set(zmq::sockopt::curve_server, true);
        sock_->set(zmq::sockopt::curve_secretkey, curve_secret_);
    }
    sock_->set(zmq::sockopt::router_mandatory, 1);   // an unroutable reply fails the send: we see it
    sock_->set(zmq::sockopt::sndhwm, int(cfg_.send_hwm));
    sock_->set(zmq::sockopt::rcvhwm, int(cfg_.recv_hwm));
    // Up to twice the limit is read and answered "too_large"; beyond that ZeroMQ drops the peer unread.
    sock_->set(zmq::sockopt::maxmsgsize, 2 * int64_t(cfg_.max_message_bytes) + 65536);
    sock_->set(zmq::sockopt::linger, 0);
    try {
        sock_->bind(cfg_.endpoint);
    } catch (const zmq::error_t & e) {
        throw Error("cannot bind " + cfg_.endpoint + ": " + e.what() + " (another server on that port? set [server] endpoint)");
    }
    bound_ = sock_->get(zmq::sockopt::last_endpoint);
}

bool Server::send(const Origin & to, const std::string & frame) {
    if (to.local) {
        if (port_ && port_->deliver(to.local, frame)) return true;
        ++stats_.undeliverable;
        return false;
    }
    try {
        // Never block the loop on one slow client: a full queue counts as undeliverable.
        if (!sock_->send(zmq::buffer(to.peer), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
            ++stats_.undeliverable;
            return false;
        }
        if (to.delim) (void)sock_->send(zmq::message_t(), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
        (void)sock_->send(zmq::buffer(frame), zmq::send_flags::dontwait);
        return true;
    } catch (const zmq::error_t &) {   // EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
        ++stats_.undeliverable;
        return false;
    }
}

// The text as reasoning and answer, and how much of each can go out in token frames: not the
// last `hold` bytes (a stop string may still end there), nor a tool call or what may still
// become the start of one, nor a tail that may still become a <think> marker. Final: the whole
// text is known.
void Server::view(const Active & a, size_t hold, bool final, OutputView & v) const {
    const std::string_view text = a.text;
    const size_t certain = text.size() > hold ? text.size() - hold : 0;
    if (a.harmony && a.tool_format != ToolCallFormat::None) v.calls_text = text.substr(0, certain);
    if (a.harmony) {   // the channels are not contiguous in the text: the parts are rebuilt
        HarmonySplit h = split_harmony(text, final);
        v.reasoned = h.reasoned;
        v.own_reasoning = std::move(h.reasoning);
        v.own_content = std::move(h.content);
        v.reasoning = v.own_reasoning;
        v.content = v.own_content;
        v.reasoning_safe = std::min(h.reasoning_certain, v.reasoning.size() > hold ? v.reasoning.size() - hold : 0);
        v.content_safe = std::min(h.content_certain, v.content.size() > hold ? v.content.size() - hold : 0);
        return;
    }
    v.content = text;
    if (a.reasoning) {
        const ReasoningSplit s = split_reasoning(text, a.reasoning_open, final);
        v.reasoned = s.reasoned;
        v.reasoning = text.substr(s.reasoning_begin, s.reasoning_end - s.reasoning_begin);
        v.reasoning_safe = certain > s.reasoning_begin ? std::min(v.reasoning.size(), certain - s.reasoning_begin) : 0;
        v.content = text.substr(std::min(s.content_begin, text.size()));
    }
    const size_t content_from = text.size() - v.content.size();
    v.content_safe = certain > content_from ? certain - content_from : 0;
    if (a.tool_format != ToolCallFormat::None) {
        v.calls_text = v.content.substr(0, v.content_safe);
        if (!final) v.content_safe = std::min(v.content_safe, tool_call_safe_prefix(a.tool_format, v.content));
    }
}

namespace {
// This thread's CPU time: what a read cost, without the time it was descheduled (a loaded machine
// would otherwise make a short read look long, and stop a stream for nothing).
std::chrono::nanoseconds thread_cpu_now() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
}
} // namespace

void Server::call_deltas(Active & a, std::string_view text, std::vector<protocol::ToolCallDelta> & out) {
    using namespace std::chrono_literals;
    const auto start = std::chrono::steady_clock::now();
    // all requests' reading at most ~1/21 of the time: each waits 20 times its last read, times the requests
    if (start - a.calls_read_at < int64_t(20 * active_.size()) * a.calls_read_cost) return;
    const auto cpu0 = thread_cpu_now();
    const std::vector<PartialCall> now = tool_call_prefix(a.tool_format, text, a.tools);
    a.calls_read_cost = thread_cpu_now() - cpu0;
    a.calls_read_at = std::chrono::steady_clock::now();
    if (a.calls_read_cost > 5ms) {   // a call too large to read again per token (tens of thousands of keys): the done frame has it
        a.calls_diverged = true;
        std::fprintf(stderr, "moesh: request '%s': its tool calls took %.0f ms to read; they stream no more, the done frame has them\n",
                     a.id.c_str(), std::chrono::duration<double, std::milli>(a.calls_read_cost).count());
        return;
    }
    if (now.size() < a.calls_sent.size()) a.calls_diverged = true;   // no longer well formed
    for (size_t i = 0; i < now.size() && !a.calls_diverged; ++i) {
        if (i == a.calls_sent.size()) {   // a new call: its id and name
            a.call_ids.push_back(new_call_id());
            out.push_back({int64_t(i), a.call_ids.back(), now[i].name, now[i].arguments});
            a.calls_sent.push_back(now[i]);
            continue;
        }
        PartialCall & sent = a.calls_sent[i];
        if (now[i].name != sent.name || now[i].arguments.compare(0, sent.arguments.size(), sent.arguments) != 0) {
            a.calls_diverged = true;
        } else if (now[i].arguments.size() > sent.arguments.size()) {
            out.push_back({int64_t(i), {}, {}, now[i].arguments.substr(sent.arguments.size())});
            sent.arguments = now[i].arguments;
        }
    }
}

// 9 letters and digits: what Mistral's templates require of the ids they are sent back.
std::string Server::new_call_id() {
    static constexpr char k_alnum[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    std::string id(9, ' ');
    for (char & c : id) c = k_alnum[call_ids_() % 62];
    return id;
}

// The messages as chat templates read them (OpenAI's shape; arguments as objects, as
// transformers and vLLM give them, where they are JSON objects).
nlohmann::ordered_json Server::template_messages(const std::vector<protocol::ChatMessage> & messages) {
    using ojson = nlohmann::ordered_json;
    ojson out = ojson::array();
    for (const protocol::ChatMessage & m : messages) {
        ojson msg = {{"role", m.role}, {"content", m.content}};
        if (!m.tool_calls.empty()) {
            ojson & calls = msg["tool_calls"] = ojson::array();
            for (const protocol::ToolCall & c : m.tool_calls) {
                ojson args = ojson::parse(c.arguments, nullptr, /*allow_exceptions=*/false);
                if (!args.is_object()) args = c.arguments;
                calls.push_back({{"id", c.id}, {"type", "function"}, {"function", {{"name", c.name}, {"arguments", std::move(args)}}}});
            }
        }
        if (m.reasoning_content) msg["reasoning_content"] = *m.reasoning_content;
        if (m.role == "tool") {
            msg["tool_call_id"] = m.tool_call_id;
            if (!m.name.empty()) msg["name"] = m.name;
        }
        out.push_back(std::move(msg));
    }
    return out;
}

// A token's frame goes out as soon as it is sampled, except in two cases where it waits for the
// next token (or the end): when the request has stop strings (the text that may still turn into
// one, its last max_stop_bytes - 1 bytes, is held back), and for the request's last possible
// token (it carries the decoder's final bytes). The end-of-sequence token is never sent, and a
// dangling part of a UTF-8 character after the last frame is dropped, so the frames' texts add
// up to the done frame's text (and their reasoning to its reasoning).
void Server::send_pending(uint64_t handle, Active & a, const OutputView & v) {
    if (!a.pending) return;
    const std::string_view piece = v.content_safe > a.sent ? v.content.substr(a.sent, v.content_safe - a.sent) : std::string_view();
    a.sent = std::max(a.sent, v.content_safe);
    const std::string_view thought =
        v.reasoning_safe > a.reasoning_sent ? v.reasoning.substr(a.reasoning_sent, v.reasoning_safe - a.reasoning_sent) : std::string_view();
    a.reasoning_sent = std::max(a.reasoning_sent, v.reasoning_safe);
    // entries are kept for every sampled token in order, and frames go out in the same order
    const protocol::Logprobs * lp =
        a.logprobs && a.index < int64_t(a.token_logprobs.size()) ? &a.token_logprobs[size_t(a.index)] : nullptr;
    std::vector<protocol::ToolCallDelta> calls;
    if (a.stream && a.tool_format != ToolCallFormat::None && !a.calls_diverged) call_deltas(a, v.calls_text, calls);
    if (a.stream && !a.gone && !send(a.origin, token_frame(a.id, a.index, *a.pending, piece, lp, thought, calls))) {
        a.gone = true;
        to_cancel_.push_back(handle);
    }
    ++a.index;
    a.pending.reset();
}

protocol::TokenLogprob Server::token_logprob(int32_t token, float logprob) const {
    protocol::TokenLogprob t;
    t.token = token;
    t.logprob = logprob;
    if (tok_ && token >= 0 && token < tok_->n_vocab()) {
        t.bytes = tok_->token_to_piece(token);
        t.special = tok_->is_special(token);
    }
    return t;
}

protocol::Logprobs Server::logprobs_entry(int32_t token, const TokenLogprobs * lp) const {
    protocol::Logprobs l;
    l.sampled = token_logprob(token, lp ? lp->logprob : std::nanf(""));
    for (int32_t j = 0; lp && j < lp->n_top; ++j) l.top.push_back(token_logprob(lp->top_ids[j], lp->top_logprobs[j]));
    return l;
}

bool Server::on_token(uint64_t handle, int32_t token, const TokenLogprobs * lp) {
    auto it = active_.find(handle);
    if (it == active_.end()) return false;
    Active & a = it->second;
    ++stats_.tokens_out;
    const auto now = std::chrono::steady_clock::now();
    if (a.any_token) itl_.observe(std::chrono::duration<double>(now - a.last_token).count());
    a.last_token = now;
    a.any_token = true;
    if (a.logprobs && lp) a.token_logprobs.push_back(logprobs_entry(token, lp));   // the end of sequence's too
    if (std::find(eos_.begin(), eos_.end(), token) != eos_.end() ||
        (a.chat && std::find(chat_stop_.begin(), chat_stop_.end(), token) != chat_stop_.end()))
        return true;   // the scheduler ends the request (Eos); its text is not part of the completion
    const size_t hold = a.stop.empty() ? 0 : max_stop_bytes_ - 1;
    if (a.pending) {   // the view is only worth building for a frame to send
        OutputView v;
        view(a, hold, false, v);
        send_pending(handle, a, v);
    }
    if (a.decoder && token >= 0 && token < tok_->n_vocab()) a.text += std::string(a.decoder->push(token));
    a.pending = token;
    if (a.stop.empty() && a.index + 1 < a.max_tokens) {   // no reason to wait
        OutputView v;
        view(a, 0, false, v);
        send_pending(handle, a, v);
    }
    for (const std::string & s : a.stop)   // only the tail can hold a new match
        if (a.text.find(s, a.text.size() > s.size() + 64 ? a.text.size() - s.size() - 64 : 0) != std::string::npos) return false;
    return true;
}

void Server::on_done(uint64_t handle, FinishReason why, const std::vector<int32_t> & tokens, const RequestTimings & t) {
    auto it = active_.find(handle);
    if (it == active_.end()) return;
    Active & a = it->second;
    if (a.decoder && a.pending) a.text += std::string(a.decoder->flush());
    if (why == FinishReason::Stop) {   // cut the text at the first stop string
        size_t cut = a.text.size();
        for (const std::string & s : a.stop)
            if (size_t p = a.text.find(s); p != std::string::npos) cut = std::min(cut, p);
        a.text.resize(cut);
    }
    OutputView v;
    view(a, 0, true, v);
    std::vector<ParsedCall> calls;
    if (a.harmony) {   // calls are messages of their own; without tools offered, their words are the answer's
        ParsedOutput out = parse_tool_calls(ToolCallFormat::Harmony, a.text);
        if (a.tool_format == ToolCallFormat::None)
            for (const ParsedCall & c : out.calls) out.content += (out.content.empty() ? "" : "\n\n") + c.arguments;
        else
            calls = std::move(out.calls);
        v.own_content = std::move(out.content);
        v.content = v.own_content;
        v.content_safe = v.content.size();
    } else if (a.tool_format != ToolCallFormat::None) {   // the calls are not text: the text is what came before them
        ParsedOutput out = parse_tool_calls(a.tool_format, v.content, a.tools);
        calls = std::move(out.calls);
        v.own_content = std::move(out.content);
        v.content = v.own_content;
        v.content_safe = v.content.size();
    }
    send_pending(handle, a, v);
    protocol::Done d;
    if (v.reasoned) d.reasoning = std::string(v.reasoning);
    std::string content(v.content);
    for (size_t i = 0; i < calls.size(); ++i) {   // a call streamed as it was written keeps its id; one that it is not, a new one
        const bool streamed = i < a.calls_sent.size() && a.calls_sent[i].name == calls[i].name &&
                              calls[i].arguments.compare(0, a.calls_sent[i].arguments.size(), a.calls_sent[i].arguments) == 0;
        if (i < a.calls_sent.size() && !streamed) a.calls_diverged = true;
        d.tool_calls.push_back({streamed ? a.call_ids[i] : new_call_id(), std::move(calls[i].name), std::move(calls[i].arguments)});
    }
    if (a.calls_diverged || calls.size() < a.calls_sent.size())
        std::fprintf(stderr, "moesh: request '%s': a tool call streamed as it was written did not end well formed; the done frame has what was read\n",
                     a.id.c_str());
    d.tokens = tokens;
    if (why == FinishReason::Eos && !d.tokens.empty()) d.tokens.pop_back();   // the end-of-sequence token itself
    if (a.logprobs) d.logprobs = std::move(a.token_logprobs);   // with the EOS token's entry last, when it ended it
    if (a.scoring) d.prompt_logprobs = std::move(a.prompt_logprobs);
    if (a.echo) d.prompt_text = std::move(a.prompt_text);
    if (a.grammar && !a.grammar->error().empty()) {
        d.grammar_error = a.grammar->error();
        std::fprintf(stderr, "moesh: request '%s': its grammar stopped it: %s\n", a.id.c_str(), d.grammar_error->c_str());
    }
    d.text = std::move(content);
    d.finish_reason = why == FinishReason::Length ? protocol::FinishReason::Length
                      : why == FinishReason::Eos  ? protocol::FinishReason::Eos
                      : why == FinishReason::Stop ? protocol::FinishReason::Stop
                                                  : protocol::FinishReason::Cancelled;
    if (!d.tool_calls.empty() && (why == FinishReason::Eos || why == FinishReason::Stop)) d.finish_reason = protocol::FinishReason::ToolCalls;
    d.prompt_tokens = a.prompt_tokens;
    d.completion_tokens = int64_t(d.tokens.size());
    d.queue_ms = t.queue_ms;
    d.preempted = t.preempted;
    d.ttft_ms = tokens.empty() ? std::nan("") : t.ttft_ms;   // not measured: null
    d.total_ms = t.total_ms;
    d.decode_tokens_per_second = tokens.size() > 1 ? t.decode_tokens_per_second : std::nan("");
    if (why == FinishReason::Cancelled) ++stats_.cancelled;
    else ++stats_.completed;
    if (!tokens.empty()) ttft_.observe(t.ttft_ms / 1e3);
    duration_.observe(t.total_ms / 1e3);
    queue_.observe(t.queue_ms / 1e3);
    if (!a.gone) send(a.origin, done_frame(a.id, d));
    active_.erase(it);
}

void Server::generate(const Origin & from, protocol::Request && req) {
    for (const auto & [h, a] : active_)
        if (a.origin == from && a.id == req.id) {
            ++stats_.bad_requests;
            send(from, error_frame(req.id, ErrorCode::BadRequest, "a request with id '" + req.id + "' is already running"));
            return;
        }
    GenRequest g;
    ToolCallFormat tool_format = ToolCallFormat::None;   // the request's calls are read from its text
    std::string rendered;                                 // the chat prompt, when messages
    std::shared_ptr<const Grammar> forced;                // tool_choice required or named: the call's grammar
    if (req.prompt_ids) {
        g.prompt = std::move(*req.prompt_ids);
    } else if (!tok_) {
        ++stats_.bad_requests;
        send(from, error_frame(req.id, ErrorCode::BadRequest, "this model has no tokenizer: send prompt_ids"));
        return;
    } else if (req.messages) {
        if (!chat_) {
            ++stats_.bad_requests;
            send(from, error_frame(req.id, ErrorCode::BadRequest,
                                   "this model has no usable chat template (the server's log says why; `moesh serve --chat-template FILE` gives one): send prompt"));
            return;
        }
        auto refuse = [&](const std::string & why) {
            ++stats_.bad_requests;
            send(from, error_frame(req.id, ErrorCode::BadRequest, why));
        };
        const bool offer_tools = req.tools && req.tool_choice != protocol::ToolChoice::None;
        if (offer_tools && !chat_->takes_tools() && chat_->tool_call_format() == ToolCallFormat::None)
            return refuse("field 'tools': this model's chat template does not take tools");
        if (offer_tools && chat_->tool_call_format() == ToolCallFormat::None)
            return refuse("field 'tools': this model's chat template writes tool calls in a format moesh does not read (it "
                          "reads the calls of Qwen/Hermes, Qwen3-Coder, Llama 3, Mistral, DeepSeek, Kimi K2, GLM, MiniMax and "
                          "gpt-oss: docs/PROTOCOL.md); tool_choice \"none\" offers no tools");
        if (offer_tools) tool_format = chat_->tool_call_format();
        if (req.tool_choice == protocol::ToolChoice::Required || req.tool_choice == protocol::ToolChoice::Named) {
            std::string why;
            auto special_id = [this](std::string_view marker) {
                const int32_t id = tok_->token_id(marker);
                return id >= 0 && tok_->is_special(id) ? id : -1;
            };
            const std::string text = force_tool_call(tool_format, *req.tools, req.tool_choice_name, special_id, &why);
            if (text.empty() || !(forced = compile_grammar(text, &why))) return refuse("field 'tool_choice': " + why);
        }
        try {   // the template's own checks (roles that must alternate, ...) refuse the request, not the server
            nlohmann::ordered_json extra = req.chat_template_kwargs ? nlohmann::ordered_json::parse(*req.chat_template_kwargs)
                                                                    : nlohmann::ordered_json::object();
            if (offer_tools) extra["tools"] = nlohmann::ordered_json::parse(*req.tools);
            nlohmann::ordered_json messages = template_messages(*req.messages);
            if (offer_tools && !chat_->takes_tools()) {   // the template never shows the tools: a system message does
                const std::string shown = tools_system_prompt(tool_format, *req.tools);
                if (!messages.empty() && messages[0]["role"] == "system" && messages[0]["content"].is_string())
                    messages[0]["content"] = shown + "\n\n" + messages[0]["content"].get<std::string>();
                else
                    messages.insert(messages.begin(), nlohmann::ordered_json{{"role", "system"}, {"content", shown}});
            }
            rendered = chat_->render(messages, /*add_generation_prompt=*/true, extra);
            // a forced call comes first: a reasoning block the prompt opened is closed for it
            if (forced && !chat_->harmony() && chat_->reasons() && prompt_opens_reasoning(rendered)) rendered += "</think>\n\n";
            g.prompt = tok_->encode(rendered, /*add_special=*/false);
        } catch (const Error & e) {
            return refuse(e.what());
        }
        g.stop_ids = chat_stop_;
    } else {
        g.prompt = tok_->encode(*req.prompt, /*add_special=*/true);
    }
    g.stop_ids.insert(g.stop_ids.end(), eos_.begin(), eos_.end());
    if (req.grammar || req.json_schema || forced) {
        std::string why;
        std::shared_ptr<const Grammar> grammar = forced ? forced : request_grammar(req, &why);
        if (!grammar) {
            ++stats_.bad_requests;
            send(from, error_frame(req.id, ErrorCode::BadRequest, why));
            return;
        }
        if (!grammar_vocab_) grammar_vocab_ = std::make_shared<const GrammarVocab>(*tok_);
        g.grammar = std::make_shared<GrammarMatcher>(std::move(grammar), grammar_vocab_, g.stop_ids);
        if (!g.grammar->error().empty()) {   // a token reference this vocabulary does not have
            ++stats_.bad_requests;
            send(from, error_frame(req.id, ErrorCode::BadRequest, "field 'grammar': " + g.grammar->error()));
            return;
        }
    }
    g.max_tokens = req.max_tokens;
    g.priority = req.priority;
    g.sampling = SamplerParams{req.temperature,        req.top_k,             req.top_p,
                               req.seed,               req.repetition_penalty, req.frequency_penalty,
                               req.presence_penalty,   std::move(req.logit_bias)};
    g.logprobs = req.logprobs;
    g.on_token = [this](uint64_t h, int32_t t, const TokenLogprobs * lp) { return on_token(h, t, lp); };
    g.prompt_logprobs = req.prompt_logprobs;
    std::vector<int32_t> prompt;   // kept to score it or echo it
    if (req.prompt_logprobs >= 0 || req.echo) prompt = g.prompt;
    std::string prompt_text;
    if (req.echo && tok_) prompt_text = tok_->decode(prompt, /*skip_special=*/true);
    if (req.max_tokens == 0 && req.prompt_logprobs < 0) {   // echo alone: nothing to compute
        protocol::Done d;
        d.prompt_text = std::move(prompt_text);
        d.prompt_tokens = int64_t(prompt.size());
        d.ttft_ms = d.decode_tokens_per_second = std::nan("");
        ++stats_.requests;
        ++stats_.completed;
        send(from, done_frame(req.id, d));
        return;
    }
    if (req.prompt_logprobs >= 0) {
        g.on_prompt_logprobs = [this](uint64_t h, int64_t pos, const TokenLogprobs & lp) {
            auto it = active_.find(h);
            if (it == active_.end() || pos >= int64_t(it->second.prompt.size())) return;
            it->second.prompt_logprobs.push_back(logprobs_entry(it->second.prompt[size_t(pos)], &lp));
        };
    }
    g.on_done = [this](uint64_t h, FinishReason w, const std::vector<int32_t> & toks, const RequestTimings & t) { on_done(h, w, toks, t); };
    const int64_t n_prompt = int64_t(g.prompt.size());
    std::shared_ptr<GrammarMatcher> grammar = g.grammar;
    uint64_t handle = 0;
    std::string why;
    const Admit a = sched_->submit(std::move(g), &handle, &why);
    if (a != Admit::Queued) {
        const ErrorCode code = a == Admit::Busy ? ErrorCode::Busy : a == Admit::TooLong ? ErrorCode::TooLong : ErrorCode::BadRequest;
        (a == Admit::Busy ? stats_.busy : stats_.rejected) += 1;
        // Busy: retry when the running request closest to its end should be done.
        send(from, error_frame(req.id, code, why, a == Admit::Busy ? std::max<int64_t>(1, std::llround(sched_->retry_after_seconds() * 1e3)) : -1));
        return;
    }
    ++stats_.requests;
    stats_.prompt_tokens += n_prompt;
    Active & act = active_[handle];
    act.origin = from;
    act.id = req.id;
    act.stream = req.stream;
    act.stop = std::move(req.stop);
    act.prompt_tokens = n_prompt;
    act.max_tokens = req.max_tokens;
    act.logprobs = req.logprobs >= 0;
    act.chat = req.messages.has_value();
    act.scoring = req.prompt_logprobs >= 0;
    act.echo = req.echo;
    act.prompt_text = std::move(prompt_text);
    act.grammar = std::move(grammar);
    act.tool_format = tool_format;
    if (tool_format != ToolCallFormat::None) act.tools = *req.tools;
    act.harmony = act.chat && chat_->harmony();
    act.reasoning = act.chat && !act.harmony && chat_->reasons();
    act.reasoning_open = act.reasoning && prompt_opens_reasoning(rendered);
    if (act.scoring) act.prompt_logprobs.push_back(logprobs_entry(prompt[0], nullptr));   // nothing before it scores it
    if (tok_) {
        // a chat's special tokens are not text, except harmony's channel markers and the markers
        // of the tool calls it reads
        std::vector<int32_t> keep;
        for (std::string_view m : tool_call_markers(tool_format))
            if (const int32_t id = tok_->token_id(m); id >= 0) keep.push_back(id);
        act.decoder = std::make_unique<StreamDecoder>(*tok_, /*skip_special=*/act.chat && !act.harmony, std::move(keep));
        // echo: the completion's text continues the prompt's (a tokenizer that strips the text's
        // first space must not strip the completion's)
        if (act.echo)
            for (int32_t t : prompt) (void)act.decoder->push(t);
    }
    if (act.scoring) act.prompt = std::move(prompt);
}

std::shared_ptr<const Grammar> Server::request_grammar(const protocol::Request & req, std::string * why) {
    const char * field = req.grammar ? "grammar" : "json_schema";
    if (!tok_) {
        *why = std::string("field '") + field + "': this model has no tokenizer, and a grammar matches text";
        return nullptr;
    }
    std::string text = req.grammar ? *req.grammar : json_schema_to_grammar(*req.json_schema, why);
    if (text.empty()) {
        *why = "field 'json_schema': " + *why;
        return nullptr;
    }
    std::shared_ptr<const Grammar> g = compile_grammar(text, why);
    if (!g) *why = std::string("field '") + field + "': " + *why;
    return g;
}

std::shared_ptr<const Grammar> Server::compile_grammar(const std::string & text, std::string * why) {
    for (size_t i = 0; i < grammars_.size(); ++i)
        if (grammars_[i].first == text) {
            std::rotate(grammars_.begin(), grammars_.begin() + long(i), grammars_.begin() + long(i) + 1);
            return grammars_.front().second;
        }
    std::shared_ptr<const Grammar> g = Grammar::parse(text, why);
    if (!g) return nullptr;
    constexpr size_t k_cached = 16;
    grammars_.insert(grammars_.begin(), {text, g});
    if (grammars_.size() > k_cached) grammars_.pop_back();
    return g;
}

void Server::handle(const Origin & from, const std::string & body, bool draining) {
    auto parsed = protocol::parse_request(body, limits_);
    if (auto * err = std::get_if<protocol::ParseError>(&parsed)) {
        ++stats_.bad_requests;
        send(from, error_frame(err->id, err->code, err->message));
        return;
    }
    protocol::Request & req = std::get<protocol::Request>(parsed);
    switch (req.type) {
    case protocol::RequestType::Ping:
        send(from, pong_frame(req.id, {{"server", "moesh"}, {"version", MOESH_VERSION}, {"model", model_name_},
                                       {"running", sched_->stats().running}, {"queued", sched_->stats().queued}}));
        return;
    case protocol::RequestType::Cancel:
        for (const auto & [h, a] : active_)
            if (a.origin == from && a.id == req.id) {
                sched_->cancel(h);   // on_done sends the final frame and erases it
                return;
            }
        send(from, error_frame(req.id, ErrorCode::NotFound, "no running or queued request with id '" + req.id + "'"));
        return;
    case protocol::RequestType::Generate:
        if (draining) {
            send(from, error_frame(req.id, ErrorCode::ShuttingDown, "the server is shutting down; send it elsewhere"));
            return;
        }
        generate(from, std::move(req));
        return;
    }
}

void Server::attach(LocalPort & port) {
    port_ = &port;
    port.max_queue = cfg_.max_queue;
}

void Server::set_placement(const ExpertPlacement & p) {
    sched_->forward().set_placement(p);
    store_ = p.store;
    gpu_ = p.device;
}

void Server::take_local(bool draining) {
    inbox_.clear();
    port_->take(inbox_);
    for (LocalPort::Message & m : inbox_) {
        const Origin from{{}, m.client, false};
        if (m.kind == LocalPort::Kind::Metrics) {
            if (!port_->deliver(m.client, metrics_text())) ++stats_.undeliverable;
        } else {
            handle(from, m.body, draining);
        }
    }
}

void Server::run(const std::atomic<bool> & stop) {
    if (!sock_) bind();
    using Clock = std::chrono::steady_clock;
    std::optional<Clock::time_point> drain_until;
    if (port_) port_->state = LocalPort::State::Ready;
    Clock::time_point last_log = Clock::now();
    for (;;) {
        const bool draining = stop.load();
        if (draining && !drain_until) {
            drain_until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg_.drain_timeout_s));
            if (port_) port_->drain();   // the HTTP front stops accepting at once
        }
        if (drain_until && (sched_->idle() || Clock::now() >= *drain_until)) break;
        if (reload_flag_ && reload_flag_->exchange(false) && reload_) reload_();
        // Read everything waiting (without blocking while there is work to step).
        zmq::pollitem_t items[2] = {{sock_->handle(), 0, ZMQ_POLLIN, 0}, {nullptr, port_ ? port_->fd() : -1, ZMQ_POLLIN, 0}};
        const int n_items = port_ ? 2 : 1;
        try {
            zmq::poll(items, size_t(n_items), std::chrono::milliseconds(sched_->idle() ? 50 : 0));
        } catch (const zmq::error_t & e) {
            if (e.num() != EINTR) throw;   // a signal (SIGTERM) woke us: the loop sees the flag
            continue;
        }
        if (port_ && (items[1].revents & ZMQ_POLLIN)) take_local(draining);
        zmq::pollitem_t & item = items[0];
        for (int n = 0; n < 1000 && (item.revents & ZMQ_POLLIN); ++n) {
            std::vector<zmq::message_t> parts;
            if (!zmq::recv_multipart(*sock_, std::back_inserter(parts), zmq::recv_flags::dontwait)) break;
            if (parts.size() >= 2) {
                Origin from{parts[0].to_string(), 0, false};
                // [peer][optional empty delimiter][body]: anything else is answered as malformed
                from.delim = parts.size() == 3 && parts[1].size() == 0;
                const size_t body = from.delim ? 2 : 1;
                if (parts.size() - body != 1) {
                    ++stats_.bad_requests;
                    from.delim = parts[1].size() == 0;
                    send(from, error_frame("", ErrorCode::BadRequest, "expected one frame holding a JSON object (after an optional empty frame)"));
                } else {
                    handle(from, parts[body].to_string(), draining);
                }
            }
            zmq::poll(&item, 1, std::chrono::milliseconds(0));
        }
        if (!sched_->idle() && sched_->step()) {
            const SchedulerStats st = sched_->stats();
            step_seconds_.observe(st.last_step_seconds);
            step_tokens_.observe(double(st.last_step_tokens));
        }
        for (uint64_t h : to_cancel_) sched_->cancel(h);   // clients that went away free their blocks now
        to_cancel_.clear();
        if (port_) {
            const SchedulerStats st = sched_->stats();
            port_->queued = st.queued;
            port_->running = st.running;
        }
        if (cfg_.log_interval_s > 0) {
            const double since = std::chrono::duration<double>(Clock::now() - last_log).count();
            if (since >= cfg_.log_interval_s) {
                log_status(since);
                last_log = Clock::now();
            }
        }
    }
    // Out of time: what still runs is cancelled (each gets its final frame).
    std::vector<uint64_t> left;
    for (const auto & [h, a] : active_) left.push_back(h);
    for (uint64_t h : left) sched_->cancel(h);
}

namespace {

// Preemptions mean the KV pool is too small for the load: say so, with what to do.
std::string preempted_note(int64_t n) {
    if (n <= 0) return "";
    return "; " + std::to_string(n) + " request" + (n == 1 ? "" : "s") +
           " preempted (the KV pool ran out: raise [server] kv_cache or lower max_sequences)";
}

} // namespace

// What vLLM users look for every few seconds: throughput both ways, the queue and the KV pool.
void Server::log_status(double seconds) {
    const SchedulerStats st = sched_->stats();
    const int64_t prefilled = st.tokens_prefilled - logged_.tokens_prefilled;
    const int64_t cached = st.tokens_prefix_cached - logged_.tokens_prefix_cached;
    const int64_t out = stats_.tokens_out - logged_tokens_out_;
    if (prefilled == 0 && out == 0 && st.running == 0 && st.queued == 0) return;   // idle: nothing to say
    const double total = double(std::max<int64_t>(1, st.kv_blocks_total));
    std::fprintf(stderr,
                 "moesh: last %.1f s: prompt %.1f tokens/s (%.0f%% from the prefix cache), generation %.1f tokens/s; "
                 "%lld running, %lld queued; KV %.0f%% used, %.0f%% cached%s\n",
                 seconds, double(prefilled) / seconds, prefilled + cached > 0 ? 100.0 * double(cached) / double(prefilled + cached) : 0.0,
                 double(out) / seconds, (long long)st.running, (long long)st.queued, 100.0 * double(st.kv_blocks_used) / total,
                 100.0 * double(st.kv_blocks_cached_idle) / total, preempted_note(st.requests_preempted - logged_.requests_preempted).c_str());
    logged_ = st;
    logged_tokens_out_ = stats_.tokens_out;
}

void Histogram::observe(double v) {
    if (!std::isfinite(v)) return;
    const size_t b = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());
    ++counts_[b];
    sum_ += v;
    ++count_;
}

void Histogram::write(std::string & out, const char * name, const char * help) const {
    char line[256];
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " histogram\n";
    int64_t cum = 0;
    for (size_t i = 0; i < bounds_.size(); ++i) {
        cum += counts_[i];
        std::snprintf(line, sizeof line, "%s_bucket{le=\"%g\"} %lld\n", name, bounds_[i], (long long)cum);
        out += line;
    }
    std::snprintf(line, sizeof line, "%s_bucket{le=\"+Inf\"} %lld\n%s_sum %.9g\n%s_count %lld\n", name, (long long)count_, name, sum_,
                  name, (long long)count_);
    out += line;
}

namespace {

void metric(std::string & out, const char * name, const char * type, const char * help, double value) {
    char line[128];
    std::snprintf(line, sizeof line, " %.17g\n", value);
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + line;
}

} // namespace

std::string Server::metrics_text() const {
    std::string o;
    metric(o, "moesh_up", "gauge", "1 when the model is loaded and requests are served.", 1);
    o += "# HELP moesh_requests_total Requests by outcome.\n# TYPE moesh_requests_total counter\n";
    const std::pair<const char *, int64_t> outcomes[] = {{"completed", stats_.completed}, {"cancelled", stats_.cancelled},
                                                          {"busy", stats_.busy},           {"refused", stats_.rejected},
                                                          {"bad_request", stats_.bad_requests}};
    for (const auto & [name, n] : outcomes) o += std::string("moesh_requests_total{outcome=\"") + name + "\"} " + std::to_string(n) + "\n";
    metric(o, "moesh_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", double(stats_.prompt_tokens));
    metric(o, "moesh_generated_tokens_total", "counter", "Tokens generated.", double(stats_.tokens_out));
    if (zap_) {
        metric(o, "moesh_curve_clients_refused_total", "counter",
               "ZeroMQ connections refused because their CURVE key is not in curve_authorized_keys.", double(zap_->denied()));
        metric(o, "moesh_curve_clients_accepted_total", "counter", "ZeroMQ connections whose CURVE key was let in.",
               double(zap_->allowed()));
    }
    metric(o, "moesh_replies_undeliverable_total", "counter", "Replies a client could not take (gone, or not reading): its request was cancelled.",
           double(stats_.undeliverable));
    const SchedulerStats st = sched_->stats();
    metric(o, "moesh_requests_running", "gauge", "Requests decoding or prefilling.", double(st.running));
    metric(o, "moesh_requests_queued", "gauge", "Requests waiting for a sequence slot or KV blocks.", double(st.queued));
    metric(o, "moesh_queue_capacity", "gauge", "Waiting requests beyond which a request is answered busy.", double(cfg_.max_queue));
    metric(o, "moesh_kv_blocks_used", "gauge", "KV cache blocks held by running requests.", double(st.kv_blocks_used));
    metric(o, "moesh_kv_blocks_total", "gauge", "KV cache blocks in the pool.", double(st.kv_blocks_total));
    metric(o, "moesh_kv_blocks_cached", "gauge", "KV cache blocks holding a cached prompt start that no request holds (reused when needed, least recently released first).",
           double(st.kv_blocks_cached_idle));
    metric(o, "moesh_prefix_cache_hit_tokens_total", "counter", "Prompt tokens not computed: their KV blocks were cached from an earlier request.",
           double(st.tokens_prefix_cached));
    metric(o, "moesh_requests_preempted_total", "counter",
           "Times a running request gave its KV blocks back because the pool was out (kv_allocation on_demand); it waited at the queue's head.",
           double(st.requests_preempted));
    metric(o, "moesh_recomputed_tokens_total", "counter", "Positions computed again when preempted requests resumed (those still cached are not).",
           double(st.tokens_recomputed));
    metric(o, "moesh_forward_steps_total", "counter", "Batched forward steps.", double(st.steps));
    ttft_.write(o, "moesh_time_to_first_token_seconds", "From the server reading a request (between forward steps) to its first generated token.");
    itl_.write(o, "moesh_inter_token_latency_seconds", "Between consecutive tokens of a request.");
    duration_.write(o, "moesh_request_duration_seconds", "From the server reading a request (between forward steps) to its end.");
    queue_.write(o, "moesh_queue_time_seconds", "From the server reading a request (between forward steps) to its admission.");
    step_seconds_.write(o, "moesh_step_duration_seconds",
                        "Forward steps' wall time: a request read during one waits for its end, then for its own.");
    step_tokens_.write(o, "moesh_step_tokens", "Tokens of each forward step (one per decoding request, plus prompt chunks).");
    const ModelConfig & c = model_.config();
    if (c.n_expert > 0) {
        o += "# HELP moesh_expert_tokens_total Tokens routed to each expert (its load).\n# TYPE moesh_expert_tokens_total counter\n";
        for (int64_t l = 0; l < c.n_layer; ++l)
            for (int64_t e = 0; e < c.n_expert; ++e)
                if (int64_t n = expert_load_[size_t(l * c.n_expert + e)])
                    o += "moesh_expert_tokens_total{layer=\"" + std::to_string(l) + "\",expert=\"" + std::to_string(e) + "\"} " +
                         std::to_string(n) + "\n";
    }
    if (store_) {
        const StoreStats s = store_->stats();
        metric(o, "moesh_expert_host_requests_total", "counter", "Experts wanted by a layer from the host tier.", double(s.requests));
        metric(o, "moesh_expert_host_hits_total", "counter", "... already in host memory (or on their way) when wanted.", double(s.hits));
        metric(o, "moesh_expert_host_misses_total", "counter", "... read from disk on demand.", double(s.misses));
        metric(o, "moesh_expert_host_evictions_total", "counter", "Experts evicted from the host tier.", double(s.evictions));
        metric(o, "moesh_expert_prefetches_total", "counter", "Expert reads started by prefetch.", double(s.prefetches));
        metric(o, "moesh_expert_prefetch_precision", "gauge", "Predicted experts that their layer then wanted.", s.prefetch_precision());
        metric(o, "moesh_expert_prefetch_recall", "gauge", "Wanted experts that had been predicted.", s.prefetch_recall());
        metric(o, "moesh_expert_disk_read_bytes_total", "counter", "Bytes of experts read from disk.", double(s.bytes_read));
        metric(o, "moesh_expert_stall_seconds_total", "counter", "Forward pass time spent waiting for experts.", s.stall_seconds);
    }
    if (gpu_) {
        const DeviceExpertStats & s = gpu_->stats();
        metric(o, "moesh_expert_gpu_requests_total", "counter", "Experts wanted by a layer from the gpu tier.", double(s.requests));
        metric(o, "moesh_expert_gpu_hits_total", "counter", "... already in device memory.", double(s.hits));
        metric(o, "moesh_expert_gpu_promotions_total", "counter", "Experts uploaded to the device for a step.", double(s.promotions));
        metric(o, "moesh_expert_gpu_in_place_total", "counter", "Experts computed on the host instead.", double(s.in_place));
        metric(o, "moesh_expert_gpu_uploaded_bytes_total", "counter", "Bytes of experts uploaded to the device.", double(s.bytes_uploaded));
        metric(o, "moesh_expert_gpu_upload_seconds_total", "counter",
               "Upload time: synchronous uploads on the host's clock, queued ones as the device timed them.",
               s.upload_seconds + s.async_upload_seconds);
        metric(o, "moesh_expert_gpu_prefetches_total", "counter", "Expert uploads started by prefetch.", double(s.prefetches));
        metric(o, "moesh_expert_gpu_prefetch_hits_total", "counter", "... that their layer then wanted.", double(s.prefetch_hits));
    }
    return o;
}

} // namespace moesh
