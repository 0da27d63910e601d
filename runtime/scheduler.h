// Continuous batching: many generation requests share each forward step.
// Requests wait in a bounded queue until a sequence slot and KV blocks can be
// had, then join the running set between steps. KV blocks are allocated one of
// two ways (KvAllocation): on demand (the prompt's blocks at admission, one more
// block as a request grows; when the pool is out, the newest request is
// preempted — its blocks freed, kept in the prefix cache while they last — and
// waits at the queue's head to be recomputed, with its sampler and grammar
// state, and go on where it stopped), or up front (prompt + max_tokens at
// admission; never preempted). Either way a running request never finds the
// pool empty and the pool's size is fixed. Each step takes one token from every decoding
// sequence first, then fills the rest of the batch with prompt chunks (at most
// prefill_chunk tokens of one prompt per step), so a long prompt never stalls
// the others. The forward pass groups all the step's tokens by expert, across
// sequences, before the expert kernels run. A finished or cancelled request
// frees its slot and blocks at once. With prefix_cache, a request starts after
// the longest start of its prompt whose KV blocks are cached (KvCache), and its
// own full blocks are published as they are computed and when it ends.
//
//   Scheduler s(model, backend, opts, &weights);
//   uint64_t h; s.submit(std::move(req), &h);   // Admit::Queued, or Busy / TooLong / Invalid
//   while (!s.idle()) s.step();                 // callbacks: on_token, on_done
//
// Thread safety: one thread calls everything (the server's loop); callbacks
// run on it, inside step() and cancel().
#pragma once

#include "plugins/loader/plugin_loader.h"
#include "runtime/backend_weights.h"
#include "runtime/forward.h"
#include "runtime/kv_cache.h"
#include "runtime/model.h"
#include "runtime/grammar.h"
#include "runtime/sampler.h"

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moesh {

// How a request gets its KV blocks. OnDemand runs more requests at once when answers end before
// max_tokens (most chat answers): UpFront holds every request's max_tokens positions from the start.
enum class KvAllocation { OnDemand, UpFront };
const char * kv_allocation_name(KvAllocation a);   // "on_demand", "up_front"

struct SchedulerOptions {
    int64_t max_batch = 64;        // tokens per forward step
    int64_t max_sequences = 16;    // requests running at once (KV sequence slots)
    int64_t kv_blocks = 256;       // KV pool, in blocks of kv_block_size positions
    int64_t kv_block_size = 16;
    int32_t kv_type = MOESH_DTYPE_F32;   // KV pool elements: MOESH_DTYPE_F32, MOESH_DTYPE_F16 or MOESH_DTYPE_Q8_0
    int64_t prefill_chunk = 32;    // prompt tokens of one request per step
    int64_t max_queue = 64;        // waiting requests; beyond that submit() says Busy
    bool prefix_cache = true;      // reuse the KV blocks of a prompt's start computed before (kv_cache.h)
    KvAllocation kv_allocation = KvAllocation::OnDemand;
};

enum class FinishReason { Length, Eos, Stop, Cancelled };
const char * finish_reason_name(FinishReason r);   // "length", "eos", "stop", "cancelled"

struct RequestTimings {
    double queue_ms = 0;     // submitted -> admitted
    double ttft_ms = 0;      // submitted -> first token
    double total_ms = 0;     // submitted -> done
    double decode_tokens_per_second = 0;   // after the first token
    int64_t preempted = 0;   // times it gave its KV blocks back and waited (kv_allocation on_demand)
};

struct GenRequest {
    std::vector<int32_t> prompt;
    int64_t max_tokens = 16;
    // Lower runs first: the queue is in priority order, first come first served within one, and a
    // request that cannot be admitted preempts running ones of a worse priority (on demand); the
    // pool running out preempts the worst priority's newest request.
    int32_t priority = 0;
    SamplerParams sampling;
    std::vector<int32_t> stop_ids;   // end the request when sampled (e.g. the model's EOS)
    // Null, or what the output must match (runtime/grammar.h; its end tokens should be stop_ids):
    // only tokens it allows are sampled, and the request ends (Stop) once nothing can follow.
    std::shared_ptr<GrammarMatcher> grammar;
    // -1: none; 0..k_max_top_logprobs: each token's log-probability and this many of the most
    // likely tokens (token_logprobs in runtime/sampler.h), given to on_token.
    int32_t logprobs = -1;
    // Called with each sampled token (lp: null unless logprobs >= 0; valid during the call);
    // return false to end the request (finish reason Stop), e.g. when a stop string appeared
    // in the text so far.
    std::function<bool(uint64_t handle, int32_t token, const TokenLogprobs * lp)> on_token;
    // -1: none; k >= 0: the log-probability of each prompt token after the ones before it, with
    // the k most likely there, given to on_prompt_logprobs for positions 1..n_prompt-1 in order
    // as they are computed. The prompt is then computed whole (no prefix cache), and max_tokens
    // may be 0 (score the prompt, generate nothing).
    int32_t prompt_logprobs = -1;
    std::function<void(uint64_t handle, int64_t position, const TokenLogprobs & lp)> on_prompt_logprobs;
    std::function<void(uint64_t handle, FinishReason, const std::vector<int32_t> & tokens, const RequestTimings &)> on_done;
};

enum class Admit { Queued, Busy, TooLong, Invalid };

struct SchedulerStats {
    int64_t running = 0, queued = 0;
    int64_t kv_blocks_used = 0, kv_blocks_total = 0;
    int64_t steps = 0, tokens_prefilled = 0, tokens_generated = 0;
    int64_t tokens_prefix_cached = 0;   // prompt tokens not computed: their KV blocks were cached
    int64_t kv_blocks_cached_idle = 0;  // cached blocks no request holds (reclaimable)
    int64_t requests_done = 0, requests_cancelled = 0, requests_refused = 0;
    int64_t requests_preempted = 0;     // times a running request gave its KV blocks back (on demand)
    int64_t tokens_recomputed = 0;      // positions computed again after a preemption (in tokens_prefilled too)
    int64_t last_step_tokens = 0;      // tokens (prompt and decode) the last forward step ran
    double last_step_seconds = 0;      // its forward pass, wall time
};

class Scheduler {
public:
    // weights may be null (the model's own memory on a host backend).
    Scheduler(const Model & model, Backend & backend, const SchedulerOptions & options, const BackendWeights * weights = nullptr);

    // Queues a request; *handle identifies it in callbacks and cancel(). Busy: the queue is
    // full (try later); TooLong: prompt + max_tokens can never fit (context or KV pool);
    // Invalid: empty prompt, a token outside the vocabulary, max_tokens < 1 (0 without prompt_logprobs),
    // bad sampling or logprobs
    // (*why says which).
    Admit submit(GenRequest request, uint64_t * handle, std::string * why = nullptr);
    // Ends a queued or running request now (on_done with Cancelled); false if unknown.
    bool cancel(uint64_t handle);
    // One forward step over the running requests (admitting waiting ones first).
    // Returns false when there was nothing to do. Backend failures throw.
    bool step();
    bool idle() const { return running_.empty() && queue_.empty(); }
    // When a refused (Busy) request may get a queue place: the running request closest to its
    // end, its steps left times the recent step time; in [0.05, 60] seconds.
    double retry_after_seconds() const;

    SchedulerStats stats() const;
    ForwardPass & forward() { return fwd_; }
    int64_t max_context() const { return max_context_; }

private:
    using Clock = std::chrono::steady_clock;
    struct Seq {
        uint64_t handle = 0;
        GenRequest req;
        int32_t slot = -1;
        // Positions prefill computes before the request decodes (n_fill): its prompt, and after a
        // preemption its generated tokens too, all but the last (which the next decode feeds);
        // and how many of them are in the KV cache (n_prefilled).
        int64_t n_fill = 0;
        int64_t n_prefilled = 0;
        std::vector<int32_t> generated;
        std::unique_ptr<Sampler> sampler;   // kept across a preemption, as the grammar is
        bool whole = false;                 // its KV blocks were reserved up front: never preempted
        int64_t n_held = 0;
        int64_t n_preempted = 0;                 // most positions it held KV for when preempted (what a resume computes again)
        bool prefilled_now = false;         // this step computed some of its positions
        Clock::time_point submitted, admitted, first_token;
        int64_t n_prompt() const { return int64_t(req.prompt.size()); }
        int32_t token_at(int64_t p) const { return p < n_prompt() ? req.prompt[size_t(p)] : generated[size_t(p - n_prompt())]; }
    };
    void admit();
    // Gives every decoding request room for the token it feeds this step, preempting the newest
    // requests while the pool is out (on demand); false if nothing is left running.
    bool grow();
    void preempt(size_t running_index);
    // The running request (not reserved whole) of the worst priority, newest first, among those worse
    // than `than`; running_.size() when there is none.
    size_t worst(int32_t than) const;
    void enqueue(Seq s, bool resumed);   // in priority order: behind its equals, or (resumed) before them
    void finish(size_t running_index, FinishReason why);
    void publish(const Seq & s);   // its computed full blocks, to the prefix cache
    static int64_t kv_positions(const Seq & s);
    // Its tokens at positions [0, n): the prompt's array, or its prompt and generated tokens in fed_.
    const int32_t * tokens(const Seq & s, int64_t n);
    static RequestTimings timings(const Seq & s);   // now

    const Model & model_;
    SchedulerOptions opt_;
    KvCache kv_;
    ForwardPass fwd_;
    int64_t max_context_;
    uint64_t next_handle_ = 1;
    std::deque<Seq> queue_;
    std::vector<Seq> running_;
    std::vector<int32_t> free_slots_;
    Batch batch_;
    struct LogitRow {
        int64_t seq;           // index in running_
        int64_t prompt_pos;    // -1: sample the next token; else the prompt position it scores (+1)
    };
    std::vector<LogitRow> logit_rows_;   // each logits row of the step
    std::vector<std::pair<size_t, FinishReason>> ended_;   // requests a step finished (reserved: no allocation per step)
    std::vector<int32_t> fed_;   // tokens(): a request's prompt and generated tokens (reused)
    TokenLogprobs logprobs_;     // the token on_token is called with, when its request asked
    SchedulerStats stats_;
    double step_seconds_ = 0;   // recent forward step time (moving average)
};

} // namespace moesh
