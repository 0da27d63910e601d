// What grammar-constrained decoding costs per token (runtime/grammar.h), on a real vocabulary:
// the whole-vocabulary mask as a request gets it (mask_us: the matcher's cache of recent masks
// included) and the trie walk behind it (walk_us: on a copy without the cache), and the one-token
// check the sampler tries first, along seeded random walks through a grammar. One JSON line.
//
//   moesh_bench_grammar --vocab .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf [--json-schema F] [--steps 400]
#include "runtime/gguf.h"
#include "runtime/grammar.h"
#include "runtime/json_schema.h"
#include "runtime/tokenizer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double us_since(clock_type::time_point t0) { return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count(); }

double pct(std::vector<double> v, double q) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(q * double(v.size())))];
}

moesh::Tokenizer load(const std::string & path) {
    if (path.size() > 5 && path.substr(path.size() - 5) == ".gguf") {
        moesh::GgufFile f(path);
        return moesh::load_tokenizer_gguf(f, path);
    }
    return moesh::load_tokenizer_json_file(path);
}

} // namespace

int main(int argc, char ** argv) {
    std::string vocab_path = "models/moesh-tiny-py/tokenizer.json", schema_file;
    int64_t steps = 400;
    uint64_t seed = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--vocab") vocab_path = argv[i + 1];
        else if (a == "--json-schema") schema_file = argv[i + 1];
        else if (a == "--steps") steps = std::stoll(argv[i + 1]);
        else if (a == "--seed") seed = std::stoull(argv[i + 1]);
        else { std::fprintf(stderr, "unknown option %s\n", a.c_str()); return 2; }
    }
    const moesh::Tokenizer tok = load(vocab_path);
    std::string err, text;
    if (schema_file.empty()) {
        text = moesh::json_object_grammar();
    } else {
        std::ifstream in(schema_file);
        std::stringstream ss;
        ss << in.rdbuf();
        text = moesh::json_schema_to_grammar(ss.str(), &err);
        if (text.empty()) { std::fprintf(stderr, "%s\n", err.c_str()); return 1; }
    }
    const auto grammar = moesh::Grammar::parse(text, &err);
    if (!grammar) { std::fprintf(stderr, "%s\n", err.c_str()); return 1; }
    auto t0 = clock_type::now();
    const auto vocab = std::make_shared<const moesh::GrammarVocab>(tok);
    const double build_ms = us_since(t0) / 1e3;

    // Walks: each step masks the vocabulary, checks one token on its own, and takes a random
    // allowed token (the end where it is allowed, 1 time in 8, so walks finish).
    std::mt19937_64 rng(seed);
    std::vector<double> mask_us, cold_us, allows_us, accept_us;
    std::vector<uint8_t> allowed;
    std::vector<int32_t> choices;
    const int32_t end = tok.eos_id() >= 0 ? tok.eos_id() : 0;
    int64_t walks = 0, n_allowed_sum = 0;
    auto m = std::make_unique<moesh::GrammarMatcher>(grammar, vocab, std::vector<int32_t>{end});
    std::vector<uint8_t> cold_allowed;
    for (int64_t s = 0; s < steps; ++s) {
        // the trie walk itself, on a copy without the mask cache
        moesh::GrammarMatcher cold = *m;
        cold.keep_masks(false);
        t0 = clock_type::now();
        (void)cold.fill_allowed(&cold_allowed);
        cold_us.push_back(us_since(t0));
        t0 = clock_type::now();
        const int64_t n = m->fill_allowed(&allowed);
        mask_us.push_back(us_since(t0));
        n_allowed_sum += n;
        choices.clear();
        for (int32_t id = 0; id < tok.n_vocab(); ++id)
            if (allowed[size_t(id)] && id != end) choices.push_back(id);
        if (choices.empty() || (allowed[size_t(end)] && rng() % 8 == 0)) {
            m = std::make_unique<moesh::GrammarMatcher>(grammar, vocab, std::vector<int32_t>{end});
            ++walks;
            continue;
        }
        const int32_t t = choices[size_t(rng() % choices.size())];
        t0 = clock_type::now();
        (void)m->allows(t);
        allows_us.push_back(us_since(t0));
        t0 = clock_type::now();
        m->accept(t);
        accept_us.push_back(us_since(t0));
    }
    double mean = 0;
    for (double x : mask_us) mean += x;
    mean /= double(std::max<size_t>(1, mask_us.size()));
    nlohmann::json j = {{"bench", "grammar"},
                        {"vocab", vocab_path},
                        {"n_vocab", tok.n_vocab()},
                        {"trie_nodes", vocab->nodes.size()},
                        {"vocab_build_ms", build_ms},
                        {"grammar", schema_file.empty() ? "json_object" : schema_file},
                        {"steps", steps},
                        {"walks_finished", walks},
                        {"mean_allowed", double(n_allowed_sum) / double(std::max<int64_t>(1, steps))},
                        {"mask_us_mean", mean},
                        {"mask_us_p50", pct(mask_us, 0.5)},
                        {"mask_us_p99", pct(mask_us, 0.99)},
                        {"walk_us_p50", pct(cold_us, 0.5)},
                        {"walk_us_p99", pct(cold_us, 0.99)},
                        {"allows_us_p50", pct(allows_us, 0.5)},
                        {"allows_us_p99", pct(allows_us, 0.99)},
                        {"accept_us_p50", pct(accept_us, 0.5)},
                        {"accept_us_p99", pct(accept_us, 0.99)}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
}
