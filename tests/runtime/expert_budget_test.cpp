// Expert budgets do not change what the model says: with the routed experts
// served from an ExpertStore of a few slots (read from the model's files,
// evicted by each policy, with and without prefetch), greedy tokens equal the
// unconstrained run's and transformers' references; the store's invariants
// hold after each run; and the plan refuses what cannot work.
#include "runtime/expert_placement.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "test_support.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace moesh {
namespace {

namespace fs = std::filesystem;

PlacementConfig budget_config(uint64_t host_bytes, const std::string & policy, bool prefetch) {
    PlacementConfig c;
    c.tiers.push_back({"host", TierKind::Host, host_bytes, 0});
    c.tiers.push_back({"disk", TierKind::Disk, 0, 0});
    c.policy = policy;
    c.prefetch = prefetch;
    c.prefetch_min_precision = 0;   // load every prediction, right or wrong: the worst case for correctness
    return c;
}

struct Case {
    std::string model;       // folder or .gguf under the source tree
    std::string reference;   // reference.json with prompts[].ids / generated, "" for none
};

void check_model(const Case & k) {
    SCOPED_TRACE(k.model);
    const Model model = Model::load_path(std::string(MOESH_SOURCE_DIR) + "/" + k.model);
    auto be = test::open_cpu_backend(2);
    ASSERT_NE(be, nullptr);
    std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> prompts;   // ids, transformers' greedy tokens
    if (!k.reference.empty()) {
        std::ifstream in(std::string(MOESH_SOURCE_DIR) + "/" + k.reference);
        const nlohmann::json ref = nlohmann::json::parse(in);
        const auto & ps = ref.at("prompts");
        for (size_t i = 0; i < ps.size(); ++i) {
            if (ps[i].is_array())   // golden fixtures: prompts and generated are parallel arrays of ids
                prompts.push_back({ps[i].get<std::vector<int32_t>>(), ref.at("generated")[i].get<std::vector<int32_t>>()});
            else   // shipped model: objects with ids and generated
                prompts.push_back({ps[i].at("ids").get<std::vector<int32_t>>(), ps[i].at("generated").get<std::vector<int32_t>>()});
        }
    } else {
        prompts.push_back({{1, 5, 9, 13, 2, 7}, {}});
    }
    const ModelFootprint f = footprint_of(model, k.model, 256, 64);
    const int64_t n_routed = f.n_routed();
    const size_t slot = slot_bytes_for(f.max_expert_bytes());
    for (size_t pi = 0; pi < prompts.size() && pi < 2; ++pi) {
        GenerateOptions o;
        o.prompt = prompts[pi].first;
        o.n_generate = prompts[pi].second.empty() ? 24 : int64_t(prompts[pi].second.size());
        o.max_batch = 4;   // prefill in chunks: layers see several tokens and several experts at once
        const std::vector<int32_t> free_run = generate(model, *be, o).tokens;
        if (!prompts[pi].second.empty()) {
            EXPECT_EQ(free_run, prompts[pi].second) << "prompt " << pi;
        }
        for (int64_t n_slots : {int64_t(2), n_routed / 4, n_routed / 2, n_routed - 1}) {
            for (const char * policy : {"lru", "heat", "static"}) {
                for (bool prefetch : {false, true}) {
                    if (n_slots < 2) continue;
                    SCOPED_TRACE(std::to_string(n_slots) + " slots, " + policy + (prefetch ? ", prefetch" : ""));
                    PlacementConfig pc = budget_config(uint64_t(n_slots) * slot, policy, prefetch);
                    if (std::string(policy) == "static") {   // pins in layer 0, the other slots still cache (lru)
                        const int64_t n_pins = std::min<int64_t>(n_slots - 2, f.n_expert / 2);
                        if (n_pins < 1) continue;
                        pc.policy = "lru";
                        pc.pins.push_back({"host", {0, 0}, {0, n_pins - 1}});
                    }
                    const PlacementPlan plan = plan_placement(f, pc);
                    ASSERT_FALSE(plan.all_resident);
                    std::unique_ptr<ExpertStore> store = open_expert_store(model, plan);
                    ASSERT_NE(store, nullptr);
                    EXPECT_EQ(store->slots(), n_slots);
                    o.placement.store = store.get();
                    o.placement.prefetch = prefetch;
                    o.placement.prefetch_extra = prefetch && std::string(policy) == "heat" ? 1 : 0;   // wider predictions too
                    EXPECT_EQ(generate(model, *be, o).tokens, free_run) << "prompt " << pi;
                    o.placement.store = nullptr;
                    EXPECT_EQ(store->check(), "");
                    const StoreStats s = store->stats();
                    EXPECT_EQ(s.hits + s.misses, s.requests);
                    EXPECT_GT(s.misses, 0);
                    EXPECT_GT(s.bytes_read, 0u);
                    EXPECT_EQ(s.predicted > 0, prefetch);
                    EXPECT_EQ(s.prefetches > 0, prefetch);
                }
            }
        }
    }
}

TEST(ExpertBudget, ShippedModelGreedyIsUnchanged) {
    check_model({"models/moesh-tiny-py", "tests/fixtures/shipped/moesh-tiny-py/reference.json"});
}

TEST(ExpertBudget, ShippedModelQ8GgufGreedyIsUnchanged) { check_model({"models/moesh-tiny-py/model.q8_0.gguf", ""}); }

TEST(ExpertBudget, ShardedMixtralGreedyIsUnchanged) {   // two safetensors shards: two files to read from
    check_model({"tests/fixtures/mixtral_top2", "tests/fixtures/mixtral_top2/reference.json"});
}

TEST(ExpertBudget, PlanRefusesWhatCannotWork) {
    const Model model = Model::load_path(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/mixtral_top2");
    const ModelFootprint f = footprint_of(model, "mixtral_top2", 64, 8);
    const size_t slot = slot_bytes_for(f.max_expert_bytes());
    auto error_of = [&](const PlacementConfig & pc) {
        try {
            plan_placement(f, pc);
        } catch (const PlacementError & e) {
            return std::string(e.what());
        }
        return std::string("accepted");
    };
    PlacementConfig pc = budget_config(slot, "lru", true);
    EXPECT_NE(error_of(pc).find("at least 2"), std::string::npos) << error_of(pc);
    pc.tiers.pop_back();   // no disk tier, experts do not fit
    EXPECT_NE(error_of(pc).find("add a [[tier]] with kind = \"disk\""), std::string::npos) << error_of(pc);
    pc = budget_config(4 * slot, "lru", true);
    pc.pins.push_back({"host", {0, -1}, {0, -1}});   // every expert pinned into 4 slots
    EXPECT_NE(error_of(pc).find("experts pinned to tier 'host'"), std::string::npos) << error_of(pc);
    pc = budget_config(4 * slot, "lru", true);
    pc.pins.push_back({"host", {99, 99}, {0, -1}});
    EXPECT_NE(error_of(pc).find("go past the model's 2 layers"), std::string::npos) << error_of(pc);
    pc = budget_config(4 * slot, "belady", true);
    EXPECT_NE(error_of(pc).find("not one of"), std::string::npos) << error_of(pc);
    // Everything fits: nothing streams, no store.
    pc = budget_config(uint64_t(f.n_routed()) * slot, "lru", true);
    const PlacementPlan all = plan_placement(f, pc);
    EXPECT_TRUE(all.all_resident);
    EXPECT_EQ(open_expert_store(model, all), nullptr);
    EXPECT_NE(describe_plan(f, all).find("every routed expert fits"), std::string::npos);
    const PlacementPlan some = plan_placement(f, budget_config(4 * slot, "heat", true));
    EXPECT_NE(describe_plan(f, some).find("streaming: 4 of"), std::string::npos) << describe_plan(f, some);
}

} // namespace
} // namespace moesh
