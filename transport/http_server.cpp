#include "transport/http_server.h"

#include "transport/openai.h"
#include "transport/protocol.h"
#include "transport/security.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace moesh {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

class Session;

int64_t unix_now() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

} // namespace

struct HttpFront::Impl {
    HttpOptions opt;
    LocalPort & port;
    std::mutex mu;   // guards the two maps below (the server's thread reads clients)
    // Requests in flight, by port client; owning, so a session waiting for the server lives on.
    std::map<uint64_t, std::shared_ptr<Session>> clients;
    std::map<std::pair<std::string, int>, int64_t> responses;   // (route, status) -> count
    std::atomic<bool> accepting{false};
    std::atomic<int64_t> connections{0};
    std::atomic<int64_t> exchanges{0};   // requests read and not yet answered to the last byte
    std::mt19937_64 rng{std::random_device{}()};   // request ids and default seeds; io thread only
    std::string url;
    std::thread thread;
    std::mutex keys_mu;   // guards api_keys: set_api_keys may come from another thread
    std::vector<std::string> api_keys;
    // Last, so destroyed first: the sessions its queued handlers own still find the members above.
    asio::io_context ioc{1};
    tcp::acceptor acceptor{ioc};

    Impl(HttpOptions o, LocalPort & p) : opt(std::move(o)), port(p), api_keys(opt.api_keys) {}
    // Ok when no keys are set.
    security::ApiKeyCheck check_key(std::string_view authorization) {
        std::lock_guard<std::mutex> lock(keys_mu);
        return api_keys.empty() ? security::ApiKeyCheck::Ok : security::check_api_key(api_keys, authorization);
    }
    void accept();
    bool receive(uint64_t client, std::string frame);   // the server's thread
    void count(const std::string & route, int status) {
        std::lock_guard<std::mutex> lock(mu);
        ++responses[{route, status}];
    }
    std::string metrics() {   // the front's own lines, appended to the server's
        std::ostringstream o;
        o << "# HELP moesh_http_responses_total HTTP responses by route and status.\n"
             "# TYPE moesh_http_responses_total counter\n";
        std::lock_guard<std::mutex> lock(mu);
        for (const auto & [k, n] : responses)
            o << "moesh_http_responses_total{route=\"" << k.first << "\",status=\"" << k.second << "\"} " << n << "\n";
        o << "# HELP moesh_http_connections Open HTTP connections.\n# TYPE moesh_http_connections gauge\n"
          << "moesh_http_connections " << connections.load() << "\n";
        return o.str();
    }
};

namespace {

const char * state_name(LocalPort::State s) {
    switch (s) {
    case LocalPort::State::Loading: return "loading";
    case LocalPort::State::Ready: return "ok";
    case LocalPort::State::Draining: return "draining";
    }
    return "?";
}

// One connection: requests one at a time (keep-alive), each either answered at
// once or waiting for the server's frames, which arrive through on_frame().
class Session : public std::enable_shared_from_this<Session> {
public:
    Session(HttpFront::Impl & f, tcp::socket socket) : f_(f), stream_(std::move(socket)) { ++f_.connections; }
    ~Session() {
        exchange_ends();
        --f_.connections;
        forget();
    }

    void start() { read(); }

    void reject_busy() {
        respond(503, "application/json",
                openai::error_body({503, "server_overloaded", "too many connections; retry later", {}, "busy"}), false, "1");
    }

    // The server's thread: false when the frame cannot be delivered.
    bool offer(std::string frame) {
        if (closed_.load() || pending_.load() > f_.opt.max_pending_bytes) return false;
        pending_ += int64_t(frame.size());
        asio::post(stream_.get_executor(), [self = shared_from_this(), frame = std::move(frame)]() mutable {
            self->pending_ -= int64_t(frame.size());
            self->on_frame(std::move(frame));
        });
        return true;
    }

private:
    enum class Wait { None, Generate, Metrics };

    void read() {
        parser_.emplace();
        parser_->header_limit(16 * 1024);
        parser_->body_limit(uint64_t(f_.opt.max_body_bytes));
        stream_.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(f_.opt.request_timeout_s)));
        http::async_read(stream_, buf_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
    }

    // A request was read (or refused): counted until its answer's last byte is written.
    void exchange_begins() {
        if (!in_exchange_) ++f_.exchanges;
        in_exchange_ = true;
    }
    void exchange_ends() {
        if (in_exchange_) --f_.exchanges;
        in_exchange_ = false;
    }

    void on_read(beast::error_code ec) {
        if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::operation_aborted ||
            ec == asio::error::connection_reset)
            return close();
        if (ec == beast::error::timeout) return close();   // idle keep-alive, or a request too slow to arrive
        exchange_begins();
        if (ec) {
            int status = 400;
            std::string what = "malformed HTTP request: " + ec.message();
            if (ec == http::error::body_limit) {
                status = 413;
                what = "request body larger than the limit of " + std::to_string(f_.opt.max_body_bytes) + " bytes";
            } else if (ec == http::error::header_limit) {
                status = 431;
                what = "request header larger than 16 KiB";
            }
            route_ = "other";
            return respond(status, "application/json", openai::error_body({status, "invalid_request_error", what, {}, {}}), false);
        }
        stream_.expires_never();   // generation takes as long as it takes; a disconnect cancels it
        const auto & req = parser_->get();
        keep_alive_ = req.keep_alive();
        version_ = req.version();
        dispatch(req);
    }

    void dispatch(const http::request<http::string_body> & req) {
        std::string target(req.target());
        if (size_t q = target.find('?'); q != std::string::npos) target.resize(q);
        const bool get = req.method() == http::verb::get;
        const bool post = req.method() == http::verb::post;
        const LocalPort::State state = f_.port.state.load();
        auto wrong_method = [&](const char * allow) {
            route_ = target;
            respond(405, "application/json",
                    openai::error_body({405, "invalid_request_error", "use " + std::string(allow) + " for " + target, {}, {}}), keep_alive_,
                    nullptr, allow);
        };
        if (target == "/health") {
            route_ = target;
            if (!get) return wrong_method("GET");
            const bool busy = state == LocalPort::State::Ready && f_.port.max_queue.load() > 0 &&
                              f_.port.queued.load() >= f_.port.max_queue.load();
            const char * s = busy ? "busy" : state_name(state);
            nlohmann::json j = {{"status", s}, {"running", f_.port.running.load()}, {"queued", f_.port.queued.load()}};
            return respond(state == LocalPort::State::Ready && !busy ? 200 : 503, "application/json", j.dump(), keep_alive_,
                           state == LocalPort::State::Ready ? nullptr : "1");
        }
        if (target.rfind("/v1/", 0) == 0) {
            const auto auth = req.find(http::field::authorization);
            const std::string_view header = auth == req.end() ? std::string_view() : std::string_view(auth->value().data(), auth->value().size());
            const auto check = f_.check_key(header);
            if (check != security::ApiKeyCheck::Ok) {
                route_ = target == "/v1/models" || target == "/v1/completions" || target == "/v1/chat/completions" ? target : "other";
                const char * what = check == security::ApiKeyCheck::Missing
                                        ? "no API key: this server needs an 'Authorization: Bearer KEY' header (OpenAI clients: api_key)"
                                    : check == security::ApiKeyCheck::Malformed
                                        ? "the Authorization header is not 'Bearer KEY'"
                                        : "the API key is not one of this server's (api_key_file)";
                return respond(401, "application/json", openai::error_body({401, "invalid_request_error", what, {}, "invalid_api_key"}),
                               keep_alive_, nullptr, nullptr, "Bearer");
            }
        }
        if (target == "/v1/models") {
            route_ = target;
            if (!get) return wrong_method("GET");
            return respond(200, "application/json", openai::models_body(f_.opt.model_name, created_), keep_alive_);
        }
        if (target == "/metrics") {
            route_ = target;
            if (!get) return wrong_method("GET");
            if (state == LocalPort::State::Loading)
                return respond(200, "text/plain; version=0.0.4; charset=utf-8",
                               "# HELP moesh_up 1 when the model is loaded and requests are served.\n# TYPE moesh_up gauge\nmoesh_up 0\n" +
                                   f_.metrics(),
                               keep_alive_);
            begin(Wait::Metrics);
            f_.port.ask_metrics(client_);
            watch();
            return;
        }
        const bool completions = target == "/v1/completions", chat = target == "/v1/chat/completions";
        if (!completions && !chat) {
            route_ = "other";
            return respond(404, "application/json",
                           openai::error_body({404, "invalid_request_error",
                                               "no route " + target.substr(0, 64) +
                                                   " (routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                                                   "GET /health, GET /metrics)",
                                               {}, {}}),
                           keep_alive_);
        }
        route_ = target;
        if (!post) return wrong_method("POST");
        if (state != LocalPort::State::Ready) {
            const bool loading = state == LocalPort::State::Loading;
            return respond(503, "application/json",
                           openai::error_body({503, loading ? "server_loading" : "server_shutting_down",
                                               loading ? "the model is still loading; retry shortly"
                                                       : "the server is shutting down; send it elsewhere",
                                               {}, loading ? "loading" : "shutting_down"}),
                           keep_alive_, "1");
        }
        endpoint_ = chat ? openai::Endpoint::Chat : openai::Endpoint::Completions;
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)f_.rng());
        openai::Defaults d;
        d.id = std::string(chat ? "chatcmpl-" : "cmpl-") + hex;
        d.max_tokens = chat ? f_.opt.default_chat_max_tokens : f_.opt.default_max_tokens;
        d.seed = f_.rng();
        d.max_body_bytes = f_.opt.max_body_bytes;
        auto t = openai::translate(endpoint_, req.body(), d);
        if (auto * e = std::get_if<openai::HttpError>(&t)) return respond(e->status, "application/json", openai::error_body(*e), keep_alive_);
        tr_ = std::move(std::get<openai::Translated>(t));
        reply_ = {d.id, f_.opt.model_name, unix_now()};
        begin(Wait::Generate);
        choices_.assign(size_t(tr_.choices()), Choice{});
        dones_.assign(choices_.size(), nlohmann::json());
        for (size_t i = 0; i < choices_.size(); ++i) choices_[i].id = openai::choice_id(d.id, int(i));
        // Each prompt's first choice goes at once, its others after it: once it has a token its
        // prompt's KV blocks are cached, and they start from them instead of computing it again.
        for (size_t i = 0; i < choices_.size(); i += size_t(tr_.n)) {
            f_.port.send(client_, openai::choice_frame(tr_, int(i)));
            choices_[i].sent = true;
        }
        watch();
    }

    void send_other_choices() {   // of the prompts whose first choice has answered
        for (size_t i = 1; i < choices_.size(); ++i)
            if (!choices_[i].sent && choices_[i - i % size_t(tr_.n)].answered) {
                f_.port.send(client_, openai::choice_frame(tr_, int(i)));
                choices_[i].sent = true;
            }
    }

    void cancel_choices() {   // those sent and not done
        for (const Choice & c : choices_)
            if (c.sent && !c.done) {
                protocol::Request cancel;
                cancel.type = protocol::RequestType::Cancel;
                cancel.id = c.id;
                f_.port.send(client_, protocol::request_frame(cancel));
            }
    }

    void begin(Wait w) {
        wait_ = w;
        headers_sent_ = false;
        client_ = f_.port.new_client();
        std::lock_guard<std::mutex> lock(f_.mu);
        f_.clients[client_] = shared_from_this();
    }

    void forget() {
        if (!client_) return;
        std::shared_ptr<Session> self;   // released after the lock: it may be the last owner
        std::lock_guard<std::mutex> lock(f_.mu);
        if (auto it = f_.clients.find(client_); it != f_.clients.end()) {
            self = std::move(it->second);
            f_.clients.erase(it);
        }
        client_ = 0;
    }

    // While a request runs nothing else is read; a readable socket then means the peer closed
    // (or pipelined a request, which waits its turn in the socket).
    void watch() {
        const uint64_t exchange = ++exchange_;
        beast::get_lowest_layer(stream_).socket().async_wait(
            tcp::socket::wait_read, [self = shared_from_this(), exchange](beast::error_code ec) {
                if (ec || exchange != self->exchange_ || self->wait_ == Wait::None) return;
                char b;
                beast::error_code pec;
                const size_t n = beast::get_lowest_layer(self->stream_).socket().receive(asio::buffer(&b, 1),
                                                                                           tcp::socket::message_peek, pec);
                if (pec == asio::error::would_block) return self->watch();
                if (pec || n == 0) self->gone();
            });
    }

    void gone() {   // the peer left mid-request: cancel it, drop the connection
        closed_ = true;
        if (wait_ == Wait::Generate && client_) cancel_choices();
        close();
    }

    void on_frame(std::string frame) {
        if (closed_) return;
        if (wait_ == Wait::Metrics) {
            finish();
            return respond(200, "text/plain; version=0.0.4; charset=utf-8", frame + f_.metrics(), keep_alive_);
        }
        if (wait_ != Wait::Generate) return;
        auto parsed = protocol::parse_response(frame);
        if (auto * e = std::get_if<protocol::ParseError>(&parsed)) {   // our own server's frame: a bug
            finish();
            return fail_exchange(openai::HttpError{500, "server_error", "unreadable reply from the engine: " + e->message, {}, {}});
        }
        const protocol::Response & r = std::get<protocol::Response>(parsed);
        size_t ci = 0;   // the choice the frame is for
        while (ci < choices_.size() && choices_[ci].id != r.id) ++ci;
        if (ci == choices_.size() && r.type != "error") return;
        if (r.type == "token") {
            Choice & c = choices_[ci];
            c.answered = true;
            send_other_choices();
            if (!tr_.stream) return;
            const std::string & text = r.body["text"].get_ref<const std::string &>();
            const auto lp = r.body.find("logprobs");
            const bool with_lp = lp != r.body.end();
            const auto reasoning = r.body.find("reasoning");
            const std::string_view thought = reasoning != r.body.end() ? std::string_view(reasoning->get_ref<const std::string &>()) : std::string_view();
            const auto calls = r.body.find("tool_calls");
            if (!text.empty() || !thought.empty() || c.first_chunk || with_lp) {
                sse(openai::text_chunk(endpoint_, reply_, text, c.first_chunk, with_lp ? &*lp : nullptr, &c.text_offset, thought, int(ci)));
                c.first_chunk = false;
            }
            if (calls != r.body.end() && calls->is_array() && endpoint_ == openai::Endpoint::Chat) {
                c.calls.add(*calls);
                sse(openai::calls_chunk(reply_, *calls, int(ci)));
            }
        } else if (r.type == "done") {
            Choice & c = choices_[ci];
            c.done = c.answered = true;
            dones_[ci] = r.body;
            send_other_choices();
            if (tr_.stream) {
                if (c.first_chunk && endpoint_ == openai::Endpoint::Chat) sse(openai::text_chunk(endpoint_, reply_, "", true, nullptr, nullptr, {}, int(ci)));
                sse(openai::finish_chunk(endpoint_, reply_, r.body, c.calls, int(ci)));
            }
            for (const Choice & other : choices_)
                if (!other.done) return;
            finish();
            if (!tr_.stream) return respond(200, "application/json", openai::completion_body(endpoint_, reply_, dones_, tr_.n), keep_alive_);
            if (tr_.include_usage) sse(openai::usage_chunk(endpoint_, reply_, dones_, tr_.n));
            sse(std::string(openai::done_event));
            end_stream();
        } else if (r.type == "error") {
            if (ci < choices_.size()) choices_[ci].done = true;
            cancel_choices();   // one choice failed: the request did
            finish();
            const auto code = protocol::error_code_from_name(r.body.value("code", "internal"));
            std::string retry;   // whole seconds, at least 1 (RFC 9110)
            if (auto it = r.body.find("retry_after_ms"); it != r.body.end() && it->is_number_integer())
                retry = std::to_string(std::max<int64_t>(1, (it->get<int64_t>() + 999) / 1000));
            std::string message = r.body.value("message", "");
            auto renames = tr_.renames;
            if (tr_.prompts.size() > 1 && ci < choices_.size()) {   // name the prompt: 'prompt[1][3]', or "prompt 1: ..."
                const size_t p = ci / size_t(tr_.n);
                renames.insert(renames.begin(), {tr_.prompts[p].first, "prompt[" + std::to_string(p) + "]"});
                if (message.rfind("field '", 0) != 0) message = "prompt " + std::to_string(p) + ": " + message;
            }
            fail_exchange(openai::from_protocol_error(code.value_or(protocol::ErrorCode::Internal), message, renames),
                          retry.empty() ? nullptr : retry.c_str());
        }
    }

    void finish() {
        wait_ = Wait::None;
        forget();
    }

    void fail_exchange(const openai::HttpError & e, const char * retry_after = nullptr) {
        if (!headers_sent_) return respond(e.status, "application/json", openai::error_body(e), keep_alive_, retry_after);
        // Mid-stream: the status is already 200; the error goes as an event, then the stream ends.
        sse("data: " + openai::error_body(e) + "\n\n");
        f_.count(route_, e.status);
        end_stream();
    }

    void sse(const std::string & event) {
        if (!headers_sent_) {
            headers_sent_ = true;
            f_.count(route_, 200);
            std::ostringstream h;
            h << "HTTP/1." << (version_ == 10 ? 0 : 1) << " 200 OK\r\n"
              << "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n";
            if (!keep_alive_) h << "Connection: close\r\n";
            h << "\r\n";
            queue(h.str());
        }
        char size[32];
        std::snprintf(size, sizeof size, "%zx\r\n", event.size());
        queue(size + event + "\r\n");
    }

    void end_stream() {
        queue("0\r\n\r\n");
        then_ = keep_alive_ ? Then::Read : Then::Close;
        kick();
    }

    void respond(int status, const char * type, std::string body, bool keep_alive, const char * retry_after = nullptr,
                 const char * allow = nullptr, const char * www_authenticate = nullptr) {
        if (!route_.empty()) f_.count(route_, status);
        http::response<http::string_body> res{http::int_to_status(unsigned(status)), version_ == 10 ? 10u : 11u};
        res.set(http::field::server, "moesh");
        res.set(http::field::content_type, type);
        if (retry_after) res.set(http::field::retry_after, retry_after);
        if (allow) res.set(http::field::allow, allow);
        if (www_authenticate) res.set(http::field::www_authenticate, www_authenticate);
        res.keep_alive(keep_alive);
        res.body() = std::move(body);
        res.prepare_payload();
        std::ostringstream o;
        o << res;
        queue(o.str());
        then_ = keep_alive ? Then::Read : Then::Close;
        kick();
    }

    enum class Then { Nothing, Read, Close };

    void queue(std::string bytes) {
        out_.push_back(std::move(bytes));
        kick();
    }

    void kick() {
        if (writing_ || closed_) return;
        if (out_.empty()) {
            const Then t = std::exchange(then_, Then::Nothing);
            if (t != Then::Nothing) exchange_ends();
            if (t == Then::Read) read();
            else if (t == Then::Close) shutdown();
            return;
        }
        writing_ = true;
        asio::async_write(stream_, asio::buffer(out_.front()), [self = shared_from_this()](beast::error_code ec, size_t) {
            self->writing_ = false;
            self->out_.pop_front();
            if (ec) return self->gone();
            self->kick();
        });
    }

    void shutdown() {
        beast::error_code ec;
        beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_send, ec);
        close();
    }

    void close() {
        exchange_ends();
        closed_ = true;
        wait_ = Wait::None;
        forget();
        beast::error_code ec;
        beast::get_lowest_layer(stream_).socket().close(ec);
    }

    HttpFront::Impl & f_;
    beast::tcp_stream stream_;
    beast::flat_buffer buf_;
    std::optional<http::request_parser<http::string_body>> parser_;
    std::deque<std::string> out_;
    bool writing_ = false;
    Then then_ = Then::Nothing;
    std::atomic<bool> closed_{false};
    std::atomic<int64_t> pending_{0};
    bool keep_alive_ = false;
    bool in_exchange_ = false;
    unsigned version_ = 11;
    std::string route_;

    Wait wait_ = Wait::None;
    uint64_t client_ = 0;   // the port client of the request in flight; 0 when none
    uint64_t exchange_ = 0;
    openai::Endpoint endpoint_ = openai::Endpoint::Completions;
    openai::Reply reply_;
    bool headers_sent_ = false;
    openai::Translated tr_;   // the request (stream, include_usage, renames) and its choices' frames
    struct Choice {   // one of the request's n choices: a generate request of its own
        std::string id;
        bool sent = false, done = false;
        bool answered = false;            // a token or the done frame came: its prompt's KV blocks are cached
        bool first_chunk = true;
        int64_t text_offset = 0;          // completions' characters streamed so far (logprobs' text_offset)
        openai::StreamedCalls calls;      // chat: the tool calls streamed as they were written
    };
    std::vector<Choice> choices_;
    std::vector<nlohmann::json> dones_;   // each choice's done frame
    const int64_t created_ = unix_now();
};

} // namespace

void HttpFront::Impl::accept() {
    acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
        if (ec) {
            if (ec == asio::error::operation_aborted || !acceptor.is_open()) return;
            std::fprintf(stderr, "moesh: http: accept failed: %s\n", ec.message().c_str());
        } else {
            auto s = std::make_shared<Session>(*this, std::move(socket));
            if (connections.load() > opt.max_connections) s->reject_busy();
            else s->start();
        }
        if (accepting.load()) accept();
    });
}

bool HttpFront::Impl::receive(uint64_t client, std::string frame) {
    std::shared_ptr<Session> s;
    {
        std::lock_guard<std::mutex> lock(mu);
        auto it = clients.find(client);
        if (it == clients.end()) return false;
        s = it->second;
    }
    return s && s->offer(std::move(frame));
}

HttpFront::HttpFront(HttpOptions options, LocalPort & port) : impl_(std::make_unique<Impl>(std::move(options), port)) {}

HttpFront::~HttpFront() { stop(); }

void HttpFront::start() {
    Impl & m = *impl_;
    const std::string where = m.opt.address + ":" + std::to_string(m.opt.port);
    beast::error_code ec;
    const asio::ip::address addr = asio::ip::make_address(m.opt.address, ec);
    if (ec) throw std::runtime_error("http: '" + m.opt.address + "' is not an IP address (set [server] http = \"127.0.0.1:8080\")");
    const tcp::endpoint ep{addr, m.opt.port};
    m.acceptor.open(ep.protocol(), ec);
    if (!ec) m.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) m.acceptor.bind(ep, ec);
    if (!ec) m.acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
        throw std::runtime_error("http: cannot listen on " + where + ": " + ec.message() +
                                 " (another server on that port? set [server] http, or --http)");
    const tcp::endpoint bound = m.acceptor.local_endpoint();
    m.url = "http://" + bound.address().to_string() + ":" + std::to_string(bound.port());
    m.port.set_receiver([&m](uint64_t client, std::string frame) { return m.receive(client, std::move(frame)); });
    m.port.set_drain_hook([this] { stop_accepting(); });
    m.accepting = true;
    m.accept();
    m.thread = std::thread([&m] {
        for (;;) {
            try {
                m.ioc.run();
                return;
            } catch (const std::exception & e) {   // a handler threw: log it, keep serving the others
                std::fprintf(stderr, "moesh: http: %s\n", e.what());
            }
        }
    });
}

std::string HttpFront::url() const { return impl_->url; }

void HttpFront::set_api_keys(std::vector<std::string> keys) {
    std::lock_guard<std::mutex> lock(impl_->keys_mu);
    impl_->api_keys = std::move(keys);
}

void HttpFront::stop_accepting() {
    Impl & m = *impl_;
    if (!m.accepting.exchange(false)) return;
    asio::post(m.ioc, [&m] {
        beast::error_code ec;
        m.acceptor.close(ec);
    });
}

void HttpFront::stop() {
    Impl & m = *impl_;
    if (!m.thread.joinable()) return;
    stop_accepting();
    // Answers the server has handed over are still being written: let them go out (bounded).
    for (int i = 0; i < 200 && m.exchanges.load() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    m.port.set_receiver({});
    m.port.set_drain_hook({});
    m.ioc.stop();
    m.thread.join();
    std::map<uint64_t, std::shared_ptr<Session>> left;   // destroyed outside the lock their destructors take
    {
        std::lock_guard<std::mutex> lock(m.mu);
        left.swap(m.clients);
    }
}

} // namespace moesh
