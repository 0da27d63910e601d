#include "runtime/server.h"

#include "runtime/error.h"

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

namespace moesh {

using protocol::ErrorCode;
using protocol::done_frame;
using protocol::error_frame;
using protocol::pong_frame;
using protocol::token_frame;

Server::Server(const Model & model, Backend & backend, const Tokenizer * tokenizer, std::optional<ChatTemplate> chat,
               const ServerConfig & config, int64_t max_batch, int64_t kv_block_size, const BackendWeights * weights,
               std::string model_name)
    : model_(model), tok_(tokenizer), chat_(std::move(chat)), cfg_(config), model_name_(std::move(model_name)) {
    const ModelConfig & c = model.config();
    SchedulerOptions so;
    so.max_batch = max_batch;
    so.max_sequences = config.max_sequences;
    so.kv_block_size = kv_block_size;
    so.kv_blocks = KvCacheSpec::blocks_for_budget(config.kv_cache, c.n_layer, c.n_head_kv, c.head_dim, so.kv_block_size);
    if (so.kv_blocks < 1)
        throw Error("[server] kv_cache = " + std::to_string(config.kv_cache) + " bytes holds no KV block of this model; raise it");
    so.prefill_chunk = config.prefill_chunk;
    so.max_queue = config.max_queue;
    sched_ = std::make_unique<Scheduler>(model, backend, so, weights);
    limits_.max_message_bytes = config.max_message_bytes;
    limits_.max_tokens = config.max_tokens;
    limits_.n_vocab = c.n_vocab;
    max_stop_bytes_ = size_t(limits_.max_stop_bytes);
    for (int64_t id : c.eos_token_ids) eos_.push_back(int32_t(id));
    if (tok_ && chat_)
        for (const char * end : {"<|im_end|>", "<|eot_id|>", "</s>"})
            if (int32_t id = tok_->token_id(end); id >= 0) chat_stop_.push_back(id);
}

Server::~Server() = default;

void Server::bind() {
    ctx_ = std::make_unique<zmq::context_t>(1);
    sock_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::router);
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

bool Server::send(const std::string & peer, bool delim, const std::string & frame) {
    try {
        // Never block the loop on one slow client: a full queue counts as undeliverable.
        if (!sock_->send(zmq::buffer(peer), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
            ++stats_.undeliverable;
            return false;
        }
        if (delim) (void)sock_->send(zmq::message_t(), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
        (void)sock_->send(zmq::buffer(frame), zmq::send_flags::dontwait);
        return true;
    } catch (const zmq::error_t &) {   // EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY)
        ++stats_.undeliverable;
        return false;
    }
}

// Token frames lag one token behind: a frame goes out when the next token comes (or at the end),
// carrying the text that became final meanwhile. The text that may still turn into a stop string
// (its last max_stop_bytes - 1 bytes) and the end-of-sequence token itself are never sent, so the
// frames' texts add up to the done frame's text.
void Server::send_pending(uint64_t handle, Active & a, size_t safe) {
    if (!a.pending) return;
    const std::string piece = safe > a.sent ? a.text.substr(a.sent, safe - a.sent) : std::string();
    a.sent = std::max(a.sent, safe);
    if (a.stream && !a.gone && !send(a.peer, a.delim, token_frame(a.id, a.index, *a.pending, piece))) {
        a.gone = true;
        to_cancel_.push_back(handle);
    }
    ++a.index;
    a.pending.reset();
}

bool Server::on_token(uint64_t handle, int32_t token) {
    auto it = active_.find(handle);
    if (it == active_.end()) return false;
    Active & a = it->second;
    ++stats_.tokens_out;
    if (std::find(eos_.begin(), eos_.end(), token) != eos_.end() ||
        std::find(chat_stop_.begin(), chat_stop_.end(), token) != chat_stop_.end())
        return true;   // the scheduler ends the request (Eos); its text is not part of the completion
    const size_t hold = a.stop.empty() ? 0 : max_stop_bytes_ - 1;
    send_pending(handle, a, a.text.size() > hold ? a.text.size() - hold : 0);
    if (a.decoder && token >= 0 && token < tok_->n_vocab()) a.text += std::string(a.decoder->push(token));
    a.pending = token;
    for (const std::string & s : a.stop)   // only the tail can hold a new match
        if (a.text.find(s, a.text.size() > s.size() + 64 ? a.text.size() - s.size() - 64 : 0) != std::string::npos) return false;
    return true;
}

void Server::on_done(uint64_t handle, FinishReason why, const std::vector<int32_t> & tokens, const RequestTimings & t) {
    auto it = active_.find(handle);
    if (it == active_.end()) return;
    Active & a = it->second;
    if (a.decoder) a.text += std::string(a.decoder->flush());
    if (why == FinishReason::Stop) {   // cut the text at the first stop string
        size_t cut = a.text.size();
        for (const std::string & s : a.stop)
            if (size_t p = a.text.find(s); p != std::string::npos) cut = std::min(cut, p);
        a.text.resize(cut);
    }
    send_pending(handle, a, a.text.size());
    protocol::Done d;
    d.tokens = tokens;
    if (why == FinishReason::Eos && !d.tokens.empty()) d.tokens.pop_back();   // the end-of-sequence token itself
    d.text = a.text;
    d.finish_reason = why == FinishReason::Length ? protocol::FinishReason::Length
                      : why == FinishReason::Eos  ? protocol::FinishReason::Eos
                      : why == FinishReason::Stop ? protocol::FinishReason::Stop
                                                  : protocol::FinishReason::Cancelled;
    d.prompt_tokens = a.prompt_tokens;
    d.completion_tokens = int64_t(d.tokens.size());
    d.queue_ms = t.queue_ms;
    d.ttft_ms = tokens.empty() ? std::nan("") : t.ttft_ms;   // not measured: null
    d.total_ms = t.total_ms;
    d.decode_tokens_per_second = tokens.size() > 1 ? t.decode_tokens_per_second : std::nan("");
    if (why == FinishReason::Cancelled) ++stats_.cancelled;
    else ++stats_.completed;
    if (!a.gone) send(a.peer, a.delim, done_frame(a.id, d));
    active_.erase(it);
}

void Server::generate(const std::string & peer, bool delim, protocol::Request && req) {
    for (const auto & [h, a] : active_)
        if (a.peer == peer && a.id == req.id) {
            ++stats_.bad_requests;
            send(peer, delim, error_frame(req.id, ErrorCode::BadRequest, "a request with id '" + req.id + "' is already running"));
            return;
        }
    GenRequest g;
    if (req.prompt_ids) {
        g.prompt = std::move(*req.prompt_ids);
    } else if (!tok_) {
        ++stats_.bad_requests;
        send(peer, delim, error_frame(req.id, ErrorCode::BadRequest, "this model has no tokenizer: send prompt_ids"));
        return;
    } else if (req.messages) {
        if (!chat_) {
            ++stats_.bad_requests;
            send(peer, delim, error_frame(req.id, ErrorCode::BadRequest,
                                   "this model has no chat template moesh recognises (ChatML, Llama-3, Mistral): send prompt"));
            return;
        }
        std::vector<moesh::ChatMessage> msgs;
        for (const auto & m : *req.messages) msgs.push_back({m.role, m.content});
        g.prompt = tok_->encode(chat_->apply(msgs, /*add_generation_prompt=*/true), /*add_special=*/false);
        g.stop_ids = chat_stop_;
    } else {
        g.prompt = tok_->encode(*req.prompt, /*add_special=*/true);
    }
    g.stop_ids.insert(g.stop_ids.end(), eos_.begin(), eos_.end());
    g.max_tokens = req.max_tokens;
    g.sampling = SamplerParams{req.temperature, req.top_k, req.top_p, req.seed};
    g.on_token = [this](uint64_t h, int32_t t) { return on_token(h, t); };
    g.on_done = [this](uint64_t h, FinishReason w, const std::vector<int32_t> & toks, const RequestTimings & t) { on_done(h, w, toks, t); };
    const int64_t n_prompt = int64_t(g.prompt.size());
    uint64_t handle = 0;
    std::string why;
    const Admit a = sched_->submit(std::move(g), &handle, &why);
    if (a != Admit::Queued) {
        const ErrorCode code = a == Admit::Busy ? ErrorCode::Busy : a == Admit::TooLong ? ErrorCode::TooLong : ErrorCode::BadRequest;
        (a == Admit::Busy ? stats_.busy : stats_.rejected) += 1;
        // Busy: retry once about a request's worth of decoding has passed.
        send(peer, delim, error_frame(req.id, code, why, a == Admit::Busy ? 1000 : -1));
        return;
    }
    ++stats_.requests;
    Active & act = active_[handle];
    act.peer = peer;
    act.id = req.id;
    act.stream = req.stream;
    act.stop = std::move(req.stop);
    act.prompt_tokens = n_prompt;
    act.delim = delim;
    if (tok_) act.decoder = std::make_unique<StreamDecoder>(*tok_, /*skip_special=*/req.messages.has_value());
}

void Server::handle(const std::string & peer, const std::string & body, bool delim, bool draining) {
    auto parsed = protocol::parse_request(body, limits_);
    if (auto * err = std::get_if<protocol::ParseError>(&parsed)) {
        ++stats_.bad_requests;
        send(peer, delim, error_frame(err->id, err->code, err->message));
        return;
    }
    protocol::Request & req = std::get<protocol::Request>(parsed);
    switch (req.type) {
    case protocol::RequestType::Ping:
        send(peer, delim, pong_frame(req.id, {{"server", "moesh"}, {"version", MOESH_VERSION}, {"model", model_name_},
                                       {"running", sched_->stats().running}, {"queued", sched_->stats().queued}}));
        return;
    case protocol::RequestType::Cancel:
        for (const auto & [h, a] : active_)
            if (a.peer == peer && a.id == req.id) {
                sched_->cancel(h);   // on_done sends the final frame and erases it
                return;
            }
        send(peer, delim, error_frame(req.id, ErrorCode::NotFound, "no running or queued request with id '" + req.id + "'"));
        return;
    case protocol::RequestType::Generate:
        if (draining) {
            send(peer, delim, error_frame(req.id, ErrorCode::ShuttingDown, "the server is shutting down; send it elsewhere"));
            return;
        }
        generate(peer, delim, std::move(req));
        return;
    }
}

void Server::run(const std::atomic<bool> & stop) {
    if (!sock_) bind();
    using Clock = std::chrono::steady_clock;
    std::optional<Clock::time_point> drain_until;
    for (;;) {
        const bool draining = stop.load();
        if (draining && !drain_until) drain_until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                                       std::chrono::duration<double>(cfg_.drain_timeout_s));
        if (drain_until && (sched_->idle() || Clock::now() >= *drain_until)) break;
        // Read everything waiting (without blocking while there is work to step).
        zmq::pollitem_t item{sock_->handle(), 0, ZMQ_POLLIN, 0};
        try {
            zmq::poll(&item, 1, std::chrono::milliseconds(sched_->idle() ? 50 : 0));
        } catch (const zmq::error_t & e) {
            if (e.num() != EINTR) throw;   // a signal (SIGTERM) woke us: the loop sees the flag
            continue;
        }
        for (int n = 0; n < 1000 && (item.revents & ZMQ_POLLIN); ++n) {
            std::vector<zmq::message_t> parts;
            if (!zmq::recv_multipart(*sock_, std::back_inserter(parts), zmq::recv_flags::dontwait)) break;
            if (parts.size() >= 2) {
                const std::string peer = parts[0].to_string();
                // [peer][optional empty delimiter][body]: anything else is answered as malformed
                const bool delim = parts.size() == 3 && parts[1].size() == 0;
                const size_t body = delim ? 2 : 1;
                if (parts.size() - body != 1) {
                    ++stats_.bad_requests;
                    send(peer, parts[1].size() == 0, error_frame("", ErrorCode::BadRequest,
                                                                 "expected one frame holding a JSON object (after an optional empty frame)"));
                } else {
                    handle(peer, parts[body].to_string(), delim, draining);
                }
            }
            zmq::poll(&item, 1, std::chrono::milliseconds(0));
        }
        if (!sched_->idle()) sched_->step();
        for (uint64_t h : to_cancel_) sched_->cancel(h);   // clients that went away free their blocks now
        to_cancel_.clear();
    }
    // Out of time: what still runs is cancelled (each gets its final frame).
    std::vector<uint64_t> left;
    for (const auto & [h, a] : active_) left.push_back(h);
    for (uint64_t h : left) sched_->cancel(h);
}

} // namespace moesh
