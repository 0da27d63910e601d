#include "runtime/scheduler.h"

#include "runtime/error.h"

#include <algorithm>
#include <utility>

namespace moesh {

const char * finish_reason_name(FinishReason r) {
    switch (r) {
    case FinishReason::Length: return "length";
    case FinishReason::Eos: return "eos";
    case FinishReason::Stop: return "stop";
    case FinishReason::Cancelled: return "cancelled";
    }
    return "?";
}

const char * kv_allocation_name(KvAllocation a) { return a == KvAllocation::UpFront ? "up_front" : "on_demand"; }

namespace {

KvCacheSpec kv_spec(const ModelConfig & c, const SchedulerOptions & o) {
    KvCacheSpec s;
    s.n_layer = c.n_layer;
    s.n_head_kv = c.n_head_kv;
    s.head_dim = c.head_dim;
    s.block_size = o.kv_block_size;
    s.n_blocks = o.kv_blocks;
    s.n_seq_max = o.max_sequences;
    s.type = o.kv_type;
    return s;
}

double ms(std::chrono::steady_clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

} // namespace

Scheduler::Scheduler(const Model & model, Backend & backend, const SchedulerOptions & o, const BackendWeights * weights)
    : model_(model), opt_(o), kv_(kv_spec(model.config(), o), backend), fwd_(model, backend, kv_, o.max_batch, weights),
      max_context_(std::min(model.config().max_positions, o.kv_blocks * o.kv_block_size)) {
    if (o.max_batch < 1 || o.max_sequences < 1 || o.prefill_chunk < 1 || o.max_queue < 0)
        throw Error("scheduler: max_batch, max_sequences and prefill_chunk must be positive, max_queue not negative");
    for (int32_t s = int32_t(o.max_sequences) - 1; s >= 0; --s) free_slots_.push_back(s);
    running_.reserve(size_t(o.max_sequences));
    batch_.token.reserve(size_t(o.max_batch));
    logit_rows_.reserve(size_t(o.max_batch));
    ended_.reserve(size_t(o.max_sequences));
    fed_.reserve(size_t(max_context_));
    stats_.kv_blocks_total = o.kv_blocks;
}

Admit Scheduler::submit(GenRequest r, uint64_t * handle, std::string * why) {
    const ModelConfig & c = model_.config();
    auto refuse = [&](Admit a, const std::string & msg) {
        if (why) *why = msg;
        ++stats_.requests_refused;
        return a;
    };
    if (r.prompt.empty()) return refuse(Admit::Invalid, "the prompt is empty");
    for (int32_t t : r.prompt)
        if (t < 0 || t >= c.n_vocab)
            return refuse(Admit::Invalid, "prompt token " + std::to_string(t) + " is outside the vocabulary [0, " +
                                              std::to_string(c.n_vocab) + ")");
    if (r.max_tokens < (r.prompt_logprobs >= 0 ? 0 : 1))
        return refuse(Admit::Invalid, r.prompt_logprobs >= 0 ? "max_tokens must be at least 0"
                                                             : "max_tokens must be at least 1 (0 only with prompt logprobs)");
    if (std::string e = validate(r.sampling); !e.empty()) return refuse(Admit::Invalid, e);
    for (const auto & [t, b] : r.sampling.logit_bias)
        if (t >= c.n_vocab)
            return refuse(Admit::Invalid, "logit bias token " + std::to_string(t) + " is outside the vocabulary [0, " +
                                              std::to_string(c.n_vocab) + ")");
    for (int32_t k : {r.logprobs, r.prompt_logprobs})
        if (k < -1 || k > k_max_top_logprobs)
            return refuse(Admit::Invalid, std::string(k == r.logprobs ? "logprobs" : "prompt logprobs") + " must be in [0, " +
                                              std::to_string(k_max_top_logprobs) + "] (or -1: none)");
    const int64_t need = int64_t(r.prompt.size()) + r.max_tokens;
    if (need > max_context_)
        return refuse(Admit::TooLong, "prompt (" + std::to_string(r.prompt.size()) + " tokens) + max_tokens (" +
                                          std::to_string(r.max_tokens) + ") exceed the context of " + std::to_string(max_context_) +
                                          " positions (the model's limit or the KV pool)");
    admit();   // what can run now does not count against the queue
    if (int64_t(queue_.size()) >= opt_.max_queue && !(queue_.empty() && !free_slots_.empty()))
        return refuse(Admit::Busy, "the queue is full (" + std::to_string(opt_.max_queue) + " waiting)");
    Seq s;
    s.handle = next_handle_++;
    s.req = std::move(r);
    s.submitted = Clock::now();
    *handle = s.handle;
    enqueue(std::move(s), false);
    admit();
    return Admit::Queued;
}

void Scheduler::enqueue(Seq s, bool resumed) {
    const int32_t p = s.req.priority;
    auto at = std::find_if(queue_.begin(), queue_.end(), [&](const Seq & q) { return resumed ? q.req.priority >= p : q.req.priority > p; });
    queue_.insert(at, std::move(s));
}

size_t Scheduler::worst(int32_t than) const {
    size_t v = running_.size();
    for (size_t j = 0; j < running_.size(); ++j) {
        const Seq & r = running_[j];
        if (r.whole || r.req.priority <= than) continue;
        if (v == running_.size() || std::pair(r.req.priority, r.handle) > std::pair(running_[v].req.priority, running_[v].handle)) v = j;
    }
    return v;
}

// First come, first served: a request that does not fit yet blocks the ones behind it, so a
// long request is not starved by a stream of short ones. A preempted request waits at the head.
void Scheduler::admit() {
    while (!queue_.empty()) {
        // A request that cannot be admitted takes the place of running ones of a worse priority.
        const int32_t priority = queue_.front().req.priority;
        if (free_slots_.empty()) {
            if (const size_t v = worst(priority); v < running_.size()) {
                preempt(v);
                continue;
            }
            break;
        }
        Seq & s = queue_.front();
        const int32_t slot = free_slots_.back();
        const bool resumed = s.sampler != nullptr;
        const int64_t n_prompt = s.n_prompt(), n_gen = int64_t(s.generated.size());
        const int64_t n_fill = n_gen == 0 ? n_prompt : n_prompt + n_gen - 1;
        // Before the first token the last prompt position is always computed: its logits give the
        // token. Scoring the prompt needs every position's logits, so such a request computes it all.
        const int64_t attachable = n_gen == 0 ? n_prompt - 1 : n_fill;
        const int64_t cached = opt_.prefix_cache && s.req.prompt_logprobs < 0
                                   ? kv_.attach_prefix(slot, tokens(s, attachable), attachable) : 0;
        const bool whole = opt_.kv_allocation == KvAllocation::UpFront || s.req.prompt_logprobs >= 0;
        const int64_t full = n_prompt + s.req.max_tokens;
        // On demand: what prefill computes and the next position, leaving the blocks that running
        // requests grow into next step, so that admitting this one preempts nobody at once.
        const int64_t need = whole ? full : std::min(full, n_fill + 1);
        const int64_t bs = kv_.spec().block_size;
        const int64_t new_blocks = std::max<int64_t>(0, (need + bs - 1) / bs - kv_.capacity(slot) / bs);
        int64_t headroom = 0;
        for (const Seq & r : running_)
            headroom += !r.whole && r.n_prefilled >= r.n_fill &&
                        r.n_prompt() + int64_t(r.generated.size()) > kv_.capacity(r.slot);
        if (kv_.n_free_blocks() - new_blocks < headroom || !kv_.reserve(slot, need)) {
            kv_.release(slot);
            if (const size_t v = worst(priority); v < running_.size()) {
                preempt(v);
                continue;
            }
            break;
        }
        free_slots_.pop_back();
        s.slot = slot;
        s.whole = whole;
        s.n_fill = n_fill;
        s.n_prefilled = cached;
        if (!resumed) {
            stats_.tokens_prefix_cached += cached;
            s.admitted = Clock::now();
            s.sampler = std::make_unique<Sampler>(s.req.sampling, model_.config().n_vocab, s.req.prompt);
            s.generated.reserve(size_t(s.req.max_tokens));
        }
        running_.push_back(std::move(s));
        queue_.pop_front();
    }
}

bool Scheduler::grow() {
    for (size_t i = 0; i < running_.size();) {
        Seq & s = running_[i];
        if (s.whole || s.n_prefilled < s.n_fill || kv_.reserve(s.slot, s.n_prompt() + int64_t(s.generated.size()))) {
            ++i;
            continue;
        }
        // The pool is out: the worst priority's newest request that can give its blocks back does
        // (s, if it is; s is one, so there is one).
        const size_t v = worst(INT32_MIN);
        preempt(v);
        if (v < i) --i;   // s moved down one; if v == i the next request is at i now
    }
    return !running_.empty();
}

void Scheduler::preempt(size_t i) {
    Seq s = std::move(running_[i]);
    running_.erase(running_.begin() + std::ptrdiff_t(i));
    s.n_held = std::max(s.n_held, kv_positions(s));
    publish(s);   // what it computed stays cached while the pool can keep it: a cheap resume
    kv_.release(s.slot);
    free_slots_.push_back(s.slot);
    s.slot = -1;
    s.n_prefilled = 0;
    ++s.n_preempted;
    ++stats_.requests_preempted;
    enqueue(std::move(s), true);   // newest first, so the older ones end up ahead
}

// Positions holding KV: what prefill computed so far, then every generated token but the last (a
// token's KV is written when it is fed back).
int64_t Scheduler::kv_positions(const Seq & s) {
    return s.n_prefilled < s.n_fill || s.generated.empty() ? s.n_prefilled : s.n_prompt() + int64_t(s.generated.size()) - 1;
}

const int32_t * Scheduler::tokens(const Seq & s, int64_t n) {
    if (n <= s.n_prompt()) return s.req.prompt.data();
    fed_.assign(s.req.prompt.begin(), s.req.prompt.end());
    fed_.insert(fed_.end(), s.generated.begin(), s.generated.end());
    return fed_.data();
}

void Scheduler::publish(const Seq & s) {
    if (!opt_.prefix_cache) return;
    const int64_t n = kv_positions(s);
    kv_.publish(s.slot, tokens(s, n), n);
}

RequestTimings Scheduler::timings(const Seq & s) {
    const auto now = Clock::now();
    RequestTimings t;
    t.total_ms = ms(now - s.submitted);
    t.preempted = s.n_preempted;
    if (!s.sampler) {   // never admitted
        t.queue_ms = t.total_ms;
        return t;
    }
    t.queue_ms = ms(s.admitted - s.submitted);
    t.ttft_ms = s.generated.empty() ? 0 : ms(s.first_token - s.submitted);
    const double decode_s = std::chrono::duration<double>(now - s.first_token).count();
    t.decode_tokens_per_second = s.generated.size() > 1 && decode_s > 0 ? double(s.generated.size() - 1) / decode_s : 0;
    return t;
}

void Scheduler::finish(size_t i, FinishReason why) {
    Seq s = std::move(running_[i]);
    running_.erase(running_.begin() + std::ptrdiff_t(i));
    publish(s);
    kv_.release(s.slot);
    free_slots_.push_back(s.slot);
    if (why == FinishReason::Cancelled) ++stats_.requests_cancelled;
    else ++stats_.requests_done;
    if (s.req.on_done) s.req.on_done(s.handle, why, s.generated, timings(s));
}

bool Scheduler::cancel(uint64_t handle) {
    for (size_t i = 0; i < running_.size(); ++i)
        if (running_[i].handle == handle) {
            finish(i, FinishReason::Cancelled);
            return true;
        }
    for (auto it = queue_.begin(); it != queue_.end(); ++it)
        if (it->handle == handle) {
            Seq s = std::move(*it);
            queue_.erase(it);
            ++stats_.requests_cancelled;
            if (s.req.on_done) s.req.on_done(s.handle, FinishReason::Cancelled, s.generated, timings(s));   // preempted: it has some
            return true;
        }
    return false;
}

bool Scheduler::step() {
    admit();
    if (!grow()) return false;   // nothing running
    batch_.clear();
    logit_rows_.clear();
    // Decodes first: one token each, so they never wait behind a prompt.
    for (size_t i = 0; i < running_.size() && batch_.size() < opt_.max_batch; ++i) {
        const Seq & s = running_[i];
        if (s.n_prefilled < s.n_fill) continue;
        const int64_t pos = int64_t(s.req.prompt.size() + s.generated.size()) - 1;
        batch_.add(s.generated.back(), int32_t(pos), s.slot, true);
        logit_rows_.push_back({int64_t(i), -1});
    }
    // Then prompt chunks (and a preempted request's positions again) in admission order.
    for (size_t i = 0; i < running_.size(); ++i) {
        Seq & s = running_[i];
        s.prefilled_now = false;
        if (s.n_prefilled >= s.n_fill || batch_.size() >= opt_.max_batch) continue;
        const int64_t n_prompt = s.n_prompt();
        const int64_t n = std::min({opt_.prefill_chunk, s.n_fill - s.n_prefilled, opt_.max_batch - batch_.size()});
        for (int64_t p = s.n_prefilled; p < s.n_prefilled + n; ++p) {
            const bool sample = p == n_prompt - 1 && s.generated.empty() && s.req.max_tokens > 0;
            const bool score = p + 1 < n_prompt && s.req.prompt_logprobs >= 0;
            batch_.add(s.token_at(p), int32_t(p), s.slot, sample || score);
            if (sample || score) logit_rows_.push_back({int64_t(i), sample ? -1 : p});
        }
        stats_.tokens_recomputed += std::max<int64_t>(0, std::min(s.n_prefilled + n, s.n_held) - s.n_prefilled);
        s.n_prefilled += n;
        s.prefilled_now = true;
        stats_.tokens_prefilled += n;
    }
    std::string err;
    const auto t0 = Clock::now();
    const float * logits = fwd_.run(batch_, &err);
    if (!logits) throw Error("scheduler: forward pass: " + err);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    step_seconds_ = stats_.steps == 0 ? secs : 0.8 * step_seconds_ + 0.2 * secs;
    // Prompts that grew this step: their new full blocks can serve the next request now.
    for (size_t i = 0; i < running_.size() && opt_.prefix_cache; ++i)
        if (running_[i].prefilled_now) publish(running_[i]);
    ++stats_.steps;
    stats_.last_step_tokens = batch_.size();
    stats_.last_step_seconds = secs;

    // Sample in row order; finish afterwards (finishing reorders running_).
    const ModelConfig & c = model_.config();
    std::vector<std::pair<size_t, FinishReason>> & ended = ended_;
    ended.clear();
    for (size_t row = 0; row < logit_rows_.size(); ++row) {
        const size_t i = size_t(logit_rows_[row].seq);
        Seq & s = running_[i];
        const float * row_logits = logits + row * size_t(c.n_vocab);
        if (const int64_t p = logit_rows_[row].prompt_pos; p >= 0) {   // scores prompt token p + 1
            token_logprobs(row_logits, c.n_vocab, s.req.prompt[size_t(p + 1)], s.req.prompt_logprobs, &logprobs_);
            if (s.req.on_prompt_logprobs) s.req.on_prompt_logprobs(s.handle, p + 1, logprobs_);
            continue;
        }
        const int32_t tok = s.sampler->sample(row_logits, c.n_vocab, s.req.grammar.get());
        if (tok < 0) {   // the grammar allows no token here
            ended.push_back({i, FinishReason::Stop});
            continue;
        }
        if (s.req.grammar) s.req.grammar->accept(tok);
        if (s.generated.empty()) s.first_token = Clock::now();
        s.generated.push_back(tok);
        ++stats_.tokens_generated;
        const TokenLogprobs * lp = nullptr;
        if (s.req.logprobs >= 0) {
            token_logprobs(row_logits, c.n_vocab, tok, s.req.logprobs, &logprobs_);
            lp = &logprobs_;
        }
        const bool keep = !s.req.on_token || s.req.on_token(s.handle, tok, lp);
        if (!keep) ended.push_back({i, FinishReason::Stop});
        else if (std::find(s.req.stop_ids.begin(), s.req.stop_ids.end(), tok) != s.req.stop_ids.end())
            ended.push_back({i, FinishReason::Eos});
        else if (s.req.grammar && s.req.grammar->must_end())
            ended.push_back({i, FinishReason::Stop});
        else if (int64_t(s.generated.size()) >= s.req.max_tokens)
            ended.push_back({i, FinishReason::Length});
    }
    // A request that only scores its prompt ends when the prompt is computed.
    for (size_t i = 0; i < running_.size(); ++i)
        if (running_[i].req.max_tokens == 0 && running_[i].n_prefilled == int64_t(running_[i].req.prompt.size()))
            ended.push_back({i, FinishReason::Length});
    std::sort(ended.begin(), ended.end(), [](const auto & a, const auto & b) { return a.first > b.first; });
    for (const auto & [i, why] : ended) finish(i, why);
    return true;
}

double Scheduler::retry_after_seconds() const {
    // A queue place frees when a queued request is admitted, which needs a running one to finish:
    // the soonest, at the recent step time, is the earliest a retry can get in.
    if (running_.empty()) return 0.05;
    int64_t soonest = INT64_MAX;
    for (const Seq & s : running_) {
        const int64_t prompt_left = s.n_fill - s.n_prefilled;
        const int64_t steps = (prompt_left + opt_.prefill_chunk - 1) / opt_.prefill_chunk + s.req.max_tokens -
                              int64_t(s.generated.size());
        soonest = std::min(soonest, steps);
    }
    return std::clamp(double(soonest) * step_seconds_, 0.05, 60.0);
}

SchedulerStats Scheduler::stats() const {
    SchedulerStats s = stats_;
    s.running = int64_t(running_.size());
    s.queued = int64_t(queue_.size());
    s.kv_blocks_used = opt_.kv_blocks - kv_.n_free_blocks();
    s.kv_blocks_cached_idle = kv_.n_idle_cached_blocks();
    return s;
}

} // namespace moesh
