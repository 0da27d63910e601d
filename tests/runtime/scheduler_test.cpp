// Continuous batching gives every request what it would get alone: many
// requests of different lengths, joining at different steps, in chunks of
// prefill, produce the same tokens as generate() one by one (greedy and
// seeded sampling). Admission, busy, too long, cancel and stop do what they say.
#include "runtime/generate.h"
#include "runtime/scheduler.h"
#include "test_support.h"

#include <map>
#include <random>
#include <tuple>

namespace moesh {
namespace {

const std::string k_model = std::string(MOESH_SOURCE_DIR) + "/models/moesh-tiny-py";

struct Outcome {
    std::vector<int32_t> streamed, final_tokens;
    FinishReason why = FinishReason::Length;
    RequestTimings timings;
    int done = 0;
};

GenRequest request(std::vector<int32_t> prompt, int64_t max_tokens, std::map<uint64_t, Outcome> & out, SamplerParams sp = {}) {
    GenRequest r;
    r.prompt = std::move(prompt);
    r.max_tokens = max_tokens;
    r.sampling = sp;
    r.on_token = [&out](uint64_t h, int32_t t, const TokenLogprobs *) {
        out[h].streamed.push_back(t);
        return true;
    };
    r.on_done = [&out](uint64_t h, FinishReason why, const std::vector<int32_t> & toks, const RequestTimings & t) {
        out[h].final_tokens = toks;
        out[h].why = why;
        out[h].timings = t;
        ++out[h].done;
    };
    return r;
}

std::vector<int32_t> alone(const Model & m, Backend & be, const std::vector<int32_t> & prompt, int64_t n, SamplerParams sp = {},
                           int32_t kv_type = MOESH_DTYPE_F32) {
    GenerateOptions o;
    o.prompt = prompt;
    o.n_generate = n;
    o.sampling = sp;
    o.kv_type = kv_type;
    return generate(m, be, o).tokens;
}

// n token ids of a prompt, different for each salt.
std::vector<int32_t> ids(int n, int salt) {
    std::vector<int32_t> p;
    for (int j = 0; j < n; ++j) p.push_back(int32_t((salt * 97 + 13 * j + 1) % 4000));
    return p;
}

// With an f32 and with a q8_0 KV cache (whose rows are quantized as they are written, the same
// alone and batched).
TEST(Scheduler, BatchedRequestsGetWhatTheyGetAlone) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    for (const int32_t kv_type : {MOESH_DTYPE_F32, MOESH_DTYPE_Q8_0}) {
    SCOPED_TRACE(kv_type_name(kv_type));
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 7; ++i) {
        std::vector<int32_t> p;
        for (int j = 0; j < 3 + 9 * i; ++j) p.push_back(int32_t((37 * i + 11 * j + 5) % 4000));
        prompts.push_back(p);
    }
    SchedulerOptions so;
    so.max_batch = 24;
    so.max_sequences = 4;   // fewer than the requests: some wait, then join between steps
    so.kv_blocks = 64;
    so.prefill_chunk = 8;   // the longer prompts take several steps
    so.kv_type = kv_type;
    Scheduler s(model, *be, so);
    std::map<uint64_t, Outcome> out;
    std::vector<uint64_t> handles;
    std::vector<SamplerParams> sps;
    for (size_t i = 0; i < prompts.size(); ++i) {
        SamplerParams sp;
        if (i % 2) sp = SamplerParams{0.8f, 20, 0.95f, 1000 + i};   // seeded sampling for the odd ones
        sps.push_back(sp);
        uint64_t h = 0;
        ASSERT_EQ(s.submit(request(prompts[i], 10 + int64_t(i), out, sp), &h), Admit::Queued);
        handles.push_back(h);
        if (i == 3) {   // a few steps before the rest arrive
            for (int k = 0; k < 3; ++k) s.step();
        }
    }
    int64_t max_running = 0;
    while (!s.idle()) {
        s.step();
        max_running = std::max(max_running, s.stats().running);
        EXPECT_LE(s.stats().running, so.max_sequences);
    }
    EXPECT_EQ(max_running, so.max_sequences);
    for (size_t i = 0; i < prompts.size(); ++i) {
        const Outcome & o = out[handles[i]];
        EXPECT_EQ(o.done, 1) << i;
        EXPECT_EQ(o.final_tokens, alone(model, *be, prompts[i], 10 + int64_t(i), sps[i], kv_type)) << "request " << i;
        EXPECT_EQ(o.streamed, o.final_tokens) << i;
        EXPECT_EQ(o.why, FinishReason::Length);
    }
    const SchedulerStats st = s.stats();
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.requests_done, int64_t(prompts.size()));
    }
}

TEST(Scheduler, RefusesWhatItCannotHoldAndCancelFreesAtOnce) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 16;
    so.max_sequences = 1;
    so.kv_blocks = 4;   // 64 positions
    so.kv_block_size = 16;
    so.max_queue = 2;
    Scheduler s(model, *be, so);
    std::map<uint64_t, Outcome> out;
    uint64_t h = 0;
    std::string why;
    EXPECT_EQ(s.submit(request({1, 2, 3}, 70, out), &h, &why), Admit::TooLong);
    EXPECT_NE(why.find("exceed the context of 64"), std::string::npos) << why;
    EXPECT_EQ(s.submit(request({}, 4, out), &h, &why), Admit::Invalid);
    EXPECT_EQ(s.submit(request({99999}, 4, out), &h, &why), Admit::Invalid);
    EXPECT_NE(why.find("outside the vocabulary"), std::string::npos) << why;

    uint64_t a = 0, b = 0, c = 0, d = 0, x = 0;
    ASSERT_EQ(s.submit(request({5, 6, 7}, 40, out), &a), Admit::Queued);   // the free slot takes it at once
    ASSERT_EQ(s.submit(request({8, 9}, 5, out), &b), Admit::Queued);
    ASSERT_EQ(s.submit(request({1}, 5, out), &c), Admit::Queued);
    EXPECT_EQ(s.submit(request({1}, 5, out), &x, &why), Admit::Busy);   // two waiting already
    EXPECT_NE(why.find("queue is full"), std::string::npos) << why;
    EXPECT_EQ(s.retry_after_seconds(), 0.05);   // nothing has run yet: the floor
    s.step();
    EXPECT_EQ(s.stats().running, 1);
    EXPECT_EQ(s.stats().queued, 2);
    // a busy client's hint: a's 39 tokens left at the measured step time, within [0.05, 60] s
    EXPECT_GE(s.retry_after_seconds(), 0.05);
    EXPECT_LE(s.retry_after_seconds(), 60.0);
    EXPECT_GT(s.stats().kv_blocks_used, 0);
    EXPECT_TRUE(s.cancel(a));   // frees its slot and blocks now
    EXPECT_EQ(out[a].why, FinishReason::Cancelled);
    EXPECT_EQ(s.stats().kv_blocks_used, 0);
    EXPECT_TRUE(s.cancel(c));   // a queued one
    EXPECT_EQ(out[c].done, 1);
    EXPECT_FALSE(s.cancel(12345));
    while (!s.idle()) s.step();
    EXPECT_EQ(out[b].final_tokens.size(), 5u);
    EXPECT_EQ(out[b].why, FinishReason::Length);

    // on_token returning false ends the request (a stop string); a stop id ends it too
    GenRequest r = request({5, 6, 7}, 20, out);
    r.on_token = [&](uint64_t hh, int32_t t, const TokenLogprobs *) {
        out[hh].streamed.push_back(t);
        return out[hh].streamed.size() < 3;
    };
    ASSERT_EQ(s.submit(std::move(r), &d), Admit::Queued);
    while (!s.idle()) s.step();
    EXPECT_EQ(out[d].why, FinishReason::Stop);
    EXPECT_EQ(out[d].final_tokens.size(), 3u);
    const std::vector<int32_t> free_run = alone(model, *be, {5, 6, 7}, 4);
    GenRequest e = request({5, 6, 7}, 20, out);
    e.stop_ids = {free_run[1]};
    uint64_t he = 0;
    ASSERT_EQ(s.submit(std::move(e), &he), Admit::Queued);
    while (!s.idle()) s.step();
    EXPECT_EQ(out[he].why, FinishReason::Eos);
    EXPECT_EQ(out[he].final_tokens, std::vector<int32_t>(free_run.begin(), free_run.begin() + 2));
}

// A request whose prompt starts as an earlier one did attaches that start's KV blocks instead of
// computing it, and gets the tokens it gets alone: the same prompt again, a shared start with
// another end, a chat's next turn (the earlier answer's blocks too), and after a request that
// needs the whole pool (the cached blocks give way; nothing is refused).
TEST(Scheduler, PrefixCacheReusesAPromptsStartAndChangesNoToken) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 24;
    so.max_sequences = 2;
    so.kv_blocks = 16;   // 256 positions
    so.kv_block_size = 16;
    so.prefill_chunk = 8;
    Scheduler s(model, *be, so);
    std::map<uint64_t, Outcome> out;
    auto run = [&](const std::vector<int32_t> & prompt, int64_t n, int64_t want_cached) {
        const int64_t before = s.stats().tokens_prefix_cached;
        uint64_t h = 0;
        EXPECT_EQ(s.submit(request(prompt, n, out), &h), Admit::Queued);
        while (!s.idle()) s.step();
        EXPECT_EQ(s.stats().tokens_prefix_cached - before, want_cached) << "prompt of " << prompt.size();
        EXPECT_EQ(out[h].final_tokens, alone(model, *be, prompt, n)) << "prompt of " << prompt.size();
        EXPECT_EQ(s.stats().kv_blocks_used, 0);
        return out[h].final_tokens;
    };
    std::vector<int32_t> p;
    for (int j = 0; j < 40; ++j) p.push_back(int32_t((13 * j + 7) % 4000));
    const std::vector<int32_t> first = run(p, 20, 0);           // nothing cached yet
    EXPECT_GT(s.stats().kv_blocks_cached_idle, 0);
    run(p, 20, 32);                                               // two whole blocks; the 40th token is computed
    std::vector<int32_t> other(p.begin(), p.begin() + 35);
    for (int j = 0; j < 10; ++j) other.push_back(int32_t(100 + j));
    run(other, 6, 32);                                            // the same start, another end
    std::vector<int32_t> next_turn = p;                           // the prompt, the answer's fed tokens, more
    next_turn.insert(next_turn.end(), first.begin(), first.end() - 1);
    for (int32_t t : {21, 22, 23}) next_turn.push_back(t);
    run(next_turn, 5, 48);                                        // 40 + 19 fed: three whole blocks
    std::vector<int32_t> big;
    for (int j = 0; j < 200; ++j) big.push_back(int32_t((29 * j + 3) % 4000));
    run(big, 56, 0);                                              // all 16 blocks: the cached ones give way
    EXPECT_EQ(s.stats().kv_blocks_cached_idle, 15);               // big's whole blocks: 255 positions fed
    run(p, 20, 0);                                                // p's blocks were reused for big

    // While a prompt is still being computed, only its whole computed blocks are found: after 3
    // steps of 8 tokens, one block of 16 (the second is half written).
    std::vector<int32_t> q;
    for (int j = 0; j < 64; ++j) q.push_back(int32_t((17 * j + 5) % 4000));
    uint64_t ha = 0, hb = 0;
    ASSERT_EQ(s.submit(request(q, 8, out), &ha), Admit::Queued);
    for (int k = 0; k < 3; ++k) s.step();
    const int64_t before = s.stats().tokens_prefix_cached;
    ASSERT_EQ(s.submit(request(q, 8, out), &hb), Admit::Queued);
    while (!s.idle()) s.step();
    EXPECT_EQ(s.stats().tokens_prefix_cached - before, 16);
    EXPECT_EQ(out[ha].final_tokens, alone(model, *be, q, 8));
    EXPECT_EQ(out[hb].final_tokens, out[ha].final_tokens);

    SchedulerOptions off = so;
    off.prefix_cache = false;
    Scheduler s2(model, *be, off);
    uint64_t h = 0;
    ASSERT_EQ(s2.submit(request(p, 4, out), &h), Admit::Queued);
    while (!s2.idle()) s2.step();
    ASSERT_EQ(s2.submit(request(p, 4, out), &h), Admit::Queued);
    while (!s2.idle()) s2.step();
    EXPECT_EQ(s2.stats().tokens_prefix_cached, 0);
    EXPECT_EQ(s2.stats().kv_blocks_cached_idle, 0);
}

// Requests that share cached blocks list them in each of their block tables: a step's tables then
// hold more entries than the pool has blocks (here 3 x 8 against 10), which the forward pass's step
// buffer must hold (it once assumed disjoint tables and wrote past its end; found by review).
TEST(Scheduler, SharedPrefixTablesOutnumberThePoolsBlocks) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 9;
    so.max_sequences = 3;
    so.kv_blocks = 10;
    so.kv_block_size = 4;
    so.prefill_chunk = 8;
    Scheduler s(model, *be, so);
    std::map<uint64_t, Outcome> out;
    std::vector<int32_t> p;
    for (int j = 0; j < 29; ++j) p.push_back(int32_t((31 * j + 9) % 4000));
    const std::vector<int32_t> want = alone(model, *be, p, 3);
    uint64_t h = 0;
    ASSERT_EQ(s.submit(request(p, 3, out), &h), Admit::Queued);
    while (!s.idle()) s.step();
    std::vector<uint64_t> hs(3);
    for (uint64_t & x : hs) ASSERT_EQ(s.submit(request(p, 3, out), &x), Admit::Queued);
    s.step();
    EXPECT_EQ(s.stats().running, 3);   // all three at once: 7 shared blocks and 1 own each
    while (!s.idle()) s.step();
    EXPECT_EQ(out[h].final_tokens, want);
    for (uint64_t x : hs) EXPECT_EQ(out[x].final_tokens, want);
    EXPECT_EQ(s.stats().tokens_prefix_cached, 3 * 28);
}

// On demand a request gets KV blocks as it grows; when the pool is out the newest request gives
// them back and is computed again later, with its sampler's state. More requests run at once than
// with blocks up front, and each still gets what it gets alone (greedy, seeded sampling, penalties),
// with the prefix cache (a resume finds its blocks while they last) and without it.
TEST(Scheduler, OnDemandBlocksRunMoreAtOnceAndPreemptionChangesNoToken) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    std::vector<std::vector<int32_t>> prompts;
    std::vector<SamplerParams> sps;
    std::vector<std::vector<int32_t>> want;
    const int64_t n_gen = 40;
    for (int i = 0; i < 5; ++i) {
        std::vector<int32_t> p;
        for (int j = 0; j < 12 + 6 * i; ++j) p.push_back(int32_t((41 * i + 7 * j + 3) % 4000));
        SamplerParams sp;
        if (i % 3 == 1) sp = SamplerParams{0.8f, 20, 0.95f, 77u + uint64_t(i)};
        if (i % 3 == 2) sp = SamplerParams{0.0f, 0, 1.0f, 0, 1.3f, 0.0f, 0.5f};
        prompts.push_back(p);
        sps.push_back(sp);
        want.push_back(alone(model, *be, p, n_gen, sp));
    }
    for (const KvAllocation mode : {KvAllocation::UpFront, KvAllocation::OnDemand})
        for (const bool prefix_cache : {true, false}) {
            SCOPED_TRACE(std::string(kv_allocation_name(mode)) + (prefix_cache ? ", prefix cache" : ", no prefix cache"));
            SchedulerOptions so;
            so.max_batch = 32;
            so.max_sequences = 5;
            so.kv_blocks = 12;   // 192 positions; the requests reach 52, 58, 64, 70 and 76 of them: 4 or 5 blocks
            so.kv_block_size = 16;
            so.prefill_chunk = 16;
            so.prefix_cache = prefix_cache;
            so.kv_allocation = mode;
            Scheduler s(model, *be, so);
            std::map<uint64_t, Outcome> out;
            std::vector<uint64_t> handles;
            for (size_t i = 0; i < prompts.size(); ++i) {
                uint64_t h = 0;
                ASSERT_EQ(s.submit(request(prompts[i], n_gen, out, sps[i]), &h), Admit::Queued);
                handles.push_back(h);
            }
            int64_t max_running = 0;
            for (int k = 0; !s.idle() && k < 10000; ++k) {
                s.step();
                max_running = std::max(max_running, s.stats().running);
                ASSERT_LE(s.stats().kv_blocks_used, so.kv_blocks);
            }
            ASSERT_TRUE(s.idle());
            for (size_t i = 0; i < prompts.size(); ++i) {
                const Outcome & o = out[handles[i]];
                EXPECT_EQ(o.done, 1) << i;
                EXPECT_EQ(o.final_tokens, want[i]) << "request " << i;
                EXPECT_EQ(o.streamed, o.final_tokens) << i;
            }
            const SchedulerStats st = s.stats();
            EXPECT_EQ(st.kv_blocks_used, 0);
            if (mode == KvAllocation::UpFront) {
                EXPECT_EQ(max_running, 3);   // 3 x 4 blocks
                EXPECT_EQ(st.requests_preempted, 0);
            } else {
                EXPECT_EQ(max_running, 5);   // each starts with its prompt's blocks
                EXPECT_GT(st.requests_preempted, 0);
                EXPECT_GT(st.tokens_recomputed, 0);
            }
        }
}

// A preempted request waits in the queue with the tokens it has streamed: cancelling it there
// ends it with those tokens; the others go on.
TEST(Scheduler, CancellingAPreemptedRequestGivesItsTokens) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 32;
    so.max_sequences = 4;
    so.kv_blocks = 6;
    so.kv_block_size = 16;
    Scheduler s(model, *be, so);
    std::map<uint64_t, Outcome> out;
    std::vector<uint64_t> hs;
    std::vector<std::vector<int32_t>> prompts;
    for (int i = 0; i < 4; ++i) {
        prompts.push_back(ids(10, i));
        uint64_t h = 0;
        ASSERT_EQ(s.submit(request(prompts.back(), 40, out), &h), Admit::Queued);
        hs.push_back(h);
    }
    for (int k = 0; s.stats().requests_preempted == 0 && k < 1000; ++k) s.step();
    ASSERT_EQ(s.stats().requests_preempted, 1);
    ASSERT_EQ(s.stats().queued, 1);
    ASSERT_TRUE(s.cancel(hs.back()));   // the newest went first
    const Outcome & c = out[hs.back()];
    EXPECT_EQ(c.why, FinishReason::Cancelled);
    EXPECT_FALSE(c.final_tokens.empty());
    EXPECT_EQ(c.final_tokens, c.streamed);
    EXPECT_GT(c.timings.ttft_ms, 0);   // its time as a request that ran, not as one that only waited
    EXPECT_LT(c.timings.queue_ms, c.timings.total_ms);
    EXPECT_EQ(s.stats().queued, 0);
    while (!s.idle()) s.step();
    for (size_t i = 0; i + 1 < hs.size(); ++i) EXPECT_EQ(out[hs[i]].final_tokens, alone(model, *be, prompts[i], 40)) << i;
    EXPECT_EQ(s.stats().kv_blocks_used, 0);
}

// Random loads on a small pool: requests of random lengths (many sharing a start) and priorities
// arrive over time with greedy, seeded or penalised sampling; some stop themselves, some are cancelled. In
// every mode the pool and the slots hold, each request ends once, and each gets generate()'s
// tokens alone (a cancelled one a start of them, as it streamed).
TEST(Scheduler, RandomLoadsOnASmallPoolGiveEveryRequestItsTokens) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    std::mt19937 rng(20261130);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    struct Spec {
        std::vector<int32_t> prompt;
        int64_t max_tokens;
        SamplerParams sp;
        int stop_after;   // on_token ends the request at this many tokens; 0: never
        int32_t priority;
        int arrive_step, cancel_step;   // cancel_step < 0: never
        std::vector<int32_t> alone;
    };
    std::vector<int32_t> common;
    for (int j = 0; j < 20; ++j) common.push_back(int32_t(uniform(0, 3999)));
    std::vector<Spec> specs(24);
    for (Spec & r : specs) {
        const int n = uniform(1, 40);
        if (uniform(0, 1)) r.prompt.assign(common.begin(), common.begin() + std::min(n, 20));
        while (int(r.prompt.size()) < n) r.prompt.push_back(int32_t(uniform(0, 3999)));
        r.max_tokens = uniform(1, 30);
        const int kind = uniform(0, 2);
        if (kind == 1) r.sp = SamplerParams{0.9f, 40, 0.9f, uint64_t(uniform(1, 1 << 20))};
        if (kind == 2) r.sp = SamplerParams{0.0f, 0, 1.0f, 0, 1.2f, 0.3f, 0.2f};
        r.stop_after = uniform(0, 3) == 0 ? uniform(1, 10) : 0;
        r.priority = int32_t(uniform(0, 2));
        r.arrive_step = uniform(0, 40);
        r.cancel_step = uniform(0, 5) == 0 ? r.arrive_step + uniform(0, 20) : -1;
        r.alone = alone(model, *be, r.prompt, r.max_tokens, r.sp);
    }
    for (const KvAllocation mode : {KvAllocation::OnDemand, KvAllocation::UpFront})
        for (const bool prefix_cache : {true, false}) {
            SCOPED_TRACE(std::string(kv_allocation_name(mode)) + (prefix_cache ? ", prefix cache" : ", no prefix cache"));
            SchedulerOptions so;
            so.max_batch = 16;
            so.max_sequences = 6;
            so.kv_blocks = 10;   // 80 positions; a request needs up to 70
            so.kv_block_size = 8;
            so.prefill_chunk = 8;
            so.max_queue = 64;
            so.prefix_cache = prefix_cache;
            so.kv_allocation = mode;
            Scheduler s(model, *be, so);
            std::map<uint64_t, Outcome> out;
            std::vector<uint64_t> handles(specs.size(), 0);
            int step = 0;
            for (; step < 5000; ++step) {
                for (size_t i = 0; i < specs.size(); ++i) {
                    const Spec & r = specs[i];
                    if (r.arrive_step == step) {
                        GenRequest g = request(r.prompt, r.max_tokens, out, r.sp);
                        g.priority = r.priority;
                        if (r.stop_after > 0)
                            g.on_token = [&out, n = size_t(r.stop_after)](uint64_t h, int32_t t, const TokenLogprobs *) {
                                out[h].streamed.push_back(t);
                                return out[h].streamed.size() < n;
                            };
                        ASSERT_EQ(s.submit(std::move(g), &handles[i]), Admit::Queued) << i;
                    }
                    if (r.cancel_step == step && handles[i] != 0) s.cancel(handles[i]);
                }
                if (step > 60 && s.idle()) break;
                s.step();
                ASSERT_LE(s.stats().kv_blocks_used, so.kv_blocks);
                ASSERT_LE(s.stats().running, so.max_sequences);
            }
            ASSERT_TRUE(s.idle()) << "still running after " << step << " steps";
            int64_t cancelled = 0;
            for (size_t i = 0; i < specs.size(); ++i) {
                const Spec & r = specs[i];
                const Outcome & o = out[handles[i]];
                ASSERT_EQ(o.done, 1) << i;
                EXPECT_EQ(o.streamed, o.final_tokens) << i;
                std::vector<int32_t> want = r.alone;
                if (r.stop_after > 0 && size_t(r.stop_after) < want.size()) want.resize(size_t(r.stop_after));
                if (o.why == FinishReason::Cancelled) {
                    ++cancelled;
                    ASSERT_LE(o.final_tokens.size(), want.size()) << i;
                    want.resize(o.final_tokens.size());
                }
                EXPECT_EQ(o.final_tokens, want) << "request " << i;
            }
            EXPECT_GT(cancelled, 0);
            EXPECT_EQ(s.stats().kv_blocks_used, 0);
            if (mode == KvAllocation::OnDemand) {
                EXPECT_GT(s.stats().requests_preempted, 0);
            }
        }
}

// A request admitted on demand leaves the blocks that running requests grow into next step, also
// when it reserves up front itself (scoring a prompt): it waits rather than make an older request
// give its blocks back at once.
TEST(Scheduler, ANewRequestLeavesRunningOnesRoomToGrow) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    SchedulerOptions so;
    so.max_batch = 64;
    so.max_sequences = 4;
    so.kv_blocks = 8;
    so.kv_block_size = 16;
    so.prefill_chunk = 16;
    Scheduler s(model, *be, so);
    std::map<uint64_t, Outcome> out;
    const auto prompt = ids;
    uint64_t a = 0, b = 0, w = 0;
    ASSERT_EQ(s.submit(request(prompt(10, 1), 60, out), &a), Admit::Queued);
    ASSERT_EQ(s.submit(request(prompt(10, 2), 60, out), &b), Admit::Queued);
    for (int k = 0; k < 7; ++k) s.step();   // 16 positions each: both need a second block next step
    ASSERT_EQ(out[a].streamed.size(), 7u);
    GenRequest score = request(prompt(96, 3), 0, out);   // 6 blocks, the 6 free ones
    score.prompt_logprobs = 0;
    int64_t scored = 0;
    score.on_prompt_logprobs = [&](uint64_t, int64_t, const TokenLogprobs &) { ++scored; };
    ASSERT_EQ(s.submit(std::move(score), &w), Admit::Queued);
    s.step();
    EXPECT_EQ(s.stats().requests_preempted, 0);
    EXPECT_EQ(s.stats().queued, 1);
    while (!s.idle()) s.step();
    EXPECT_EQ(scored, 95);
    EXPECT_EQ(out[a].final_tokens, alone(model, *be, prompt(10, 1), 60));
    EXPECT_EQ(out[b].final_tokens, alone(model, *be, prompt(10, 2), 60));
    EXPECT_EQ(s.stats().kv_blocks_used, 0);
}

// Priorities: the queue runs in priority order (first come, first served within one), a request
// that cannot be admitted preempts running ones of a worse priority (for a slot or for blocks),
// never an equal or better one, and every request still gets its tokens alone.
TEST(Scheduler, PrioritiesOrderTheQueueAndPreemptOnlyWorseRequests) {
    const Model model = Model::load_folder(k_model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    const auto prompt = ids;
    std::map<uint64_t, Outcome> out;
    std::vector<uint64_t> order;   // on_done calls, in order
    auto submit = [&](Scheduler & s, int n_prompt, int salt, int64_t max_tokens, int32_t priority) {
        GenRequest g = request(prompt(n_prompt, salt), max_tokens, out);
        g.priority = priority;
        auto inner = g.on_done;
        g.on_done = [&order, inner](uint64_t h, FinishReason w, const std::vector<int32_t> & t, const RequestTimings & tm) {
            order.push_back(h);
            inner(h, w, t, tm);
        };
        uint64_t h = 0;
        EXPECT_EQ(s.submit(std::move(g), &h), Admit::Queued);
        return h;
    };
    auto check_alone = [&](uint64_t h, int n_prompt, int salt, int64_t max_tokens) {
        EXPECT_EQ(out[h].final_tokens, alone(model, *be, prompt(n_prompt, salt), max_tokens)) << "salt " << salt;
    };
    {   // for a slot: a better request takes the newest of the worst priority's
        SchedulerOptions so;
        so.max_sequences = 2;
        so.kv_blocks = 64;
        Scheduler s(model, *be, so);
        const uint64_t l1 = submit(s, 8, 1, 30, 5), l2 = submit(s, 8, 2, 30, 5);
        for (int k = 0; k < 3; ++k) s.step();
        const uint64_t m = submit(s, 8, 3, 4, 5);   // an equal priority waits for a slot
        EXPECT_EQ(s.stats().requests_preempted, 0);
        const uint64_t h = submit(s, 8, 4, 10, 0);
        EXPECT_EQ(s.stats().requests_preempted, 1);
        EXPECT_EQ(s.stats().running, 2);
        while (!s.idle()) s.step();
        // h first, though it came last; m after l1 (an equal priority preempts nobody); l2 last
        EXPECT_EQ(order, (std::vector<uint64_t>{h, l1, m, l2}));
        for (auto [hh, salt, n] : {std::tuple{l1, 1, 30}, {l2, 2, 30}, {m, 3, 4}, {h, 4, 10}}) check_alone(hh, 8, salt, n);
    }
    order.clear();
    {   // the queue in priority order, first come first served within one; a better running
        // request is never preempted
        SchedulerOptions so;
        so.max_sequences = 1;
        so.kv_blocks = 64;
        Scheduler s(model, *be, so);
        const uint64_t r = submit(s, 6, 10, 8, -5);
        s.step();
        const uint64_t a = submit(s, 6, 11, 4, 2), b = submit(s, 6, 12, 4, 1), c = submit(s, 6, 13, 4, 1),
                       d = submit(s, 6, 14, 4, 2), e = submit(s, 6, 15, 4, -1);
        while (!s.idle()) s.step();
        EXPECT_EQ(order, (std::vector<uint64_t>{r, e, b, c, a, d}));
        EXPECT_EQ(s.stats().requests_preempted, 0);
    }
    order.clear();
    {   // for blocks: a better request preempts a worse one that holds the pool, which resumes after
        SchedulerOptions so;
        so.max_sequences = 4;
        so.kv_blocks = 8;   // 128 positions
        so.kv_block_size = 16;
        so.prefill_chunk = 64;
        so.max_batch = 64;
        Scheduler s(model, *be, so);
        const uint64_t l = submit(s, 100, 20, 20, 1);
        for (int k = 0; k < 3; ++k) s.step();   // 7 blocks
        const uint64_t h = submit(s, 30, 21, 10, 0);
        EXPECT_EQ(s.stats().requests_preempted, 1);
        while (!s.idle()) s.step();
        EXPECT_EQ(order, (std::vector<uint64_t>{h, l}));
        check_alone(l, 100, 20, 20);
        check_alone(h, 30, 21, 10);
        EXPECT_EQ(s.stats().kv_blocks_used, 0);
    }
}

} // namespace
} // namespace moesh
