#include "runtime/route_trace.h"

#include "runtime/error.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace moesh {

RouteTraceWriter::RouteTraceWriter(const std::string & path, const ModelConfig & c, const std::string & model_name,
                                   int64_t n_predicted)
    : path_(path), out_(path, std::ios::binary | std::ios::trunc), n_layer_(c.n_layer), k_(std::max<int64_t>(1, c.n_expert_used)),
      n_pred_(std::clamp<int64_t>(n_predicted, 0, std::max<int64_t>(0, c.n_expert))), moe_(c.layer_is_moe) {
    if (!out_) throw Error(path + ": cannot create the routing trace");
    moe_.resize(size_t(n_layer_), false);
    nlohmann::json h = {{"moesh_route_trace", 1}, {"model", model_name},     {"n_layer", c.n_layer},
                        {"n_expert", c.n_expert}, {"n_expert_used", c.n_expert_used}, {"moe_layers", moe_}};
    if (n_pred_ > 0) h["n_predicted"] = n_pred_;
    out_ << h.dump() << '\n';
}

void RouteTraceWriter::begin(const Batch & batch) {
    batch_ = batch;
    const size_t n = size_t(batch.size()) * size_t(n_layer_) * size_t(k_);
    ids_.assign(n, -1);
    weights_.assign(n, 0.0f);
    pred_.assign(size_t(batch.size()) * size_t(n_layer_) * size_t(n_pred_), -1);
}

void RouteTraceWriter::predict(int64_t layer, int64_t n_tokens, int64_t n_ranked, const int32_t * ids) {
    if (n_pred_ == 0 || layer < 0 || layer >= n_layer_ || n_tokens != batch_.size() || n_ranked < n_pred_) return;
    for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t j = 0; j < n_pred_; ++j)
            pred_[(size_t(t) * size_t(n_layer_) + size_t(layer)) * size_t(n_pred_) + size_t(j)] = ids[t * n_ranked + j];
}

void RouteTraceWriter::route(int64_t layer, int64_t n_tokens, const int32_t * ids, const float * weights) {
    if (layer < 0 || layer >= n_layer_ || n_tokens != batch_.size()) return;
    for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t j = 0; j < k_; ++j) {
            const size_t at = (size_t(t) * size_t(n_layer_) + size_t(layer)) * size_t(k_) + size_t(j);
            ids_[at] = ids[t * k_ + j];
            weights_[at] = weights[t * k_ + j];
        }
}

void RouteTraceWriter::end() {
    std::string line;
    char num[32];
    for (int64_t t = 0; t < batch_.size(); ++t) {
        line = "{\"seq\":" + std::to_string(batch_.seq[size_t(t)]) + ",\"pos\":" + std::to_string(batch_.pos[size_t(t)]) +
               ",\"token\":" + std::to_string(batch_.token[size_t(t)]) + ",\"step\":" + std::to_string(n_steps_) +
               ",\"experts\":[";
        std::string w = ",\"weights\":[";
        for (int64_t l = 0; l < n_layer_; ++l) {
            const size_t at = (size_t(t) * size_t(n_layer_) + size_t(l)) * size_t(k_);
            const char * sep = l ? "," : "";
            if (!moe_[size_t(l)]) {
                line += std::string(sep) + "null";
                w += std::string(sep) + "null";
                continue;
            }
            line += std::string(sep) + "[";
            w += std::string(sep) + "[";
            for (int64_t j = 0; j < k_; ++j) {
                if (j) line += ',';   // appended apart: GCC 12 warns falsely (-Wrestrict) on "," + to_string
                line += std::to_string(ids_[at + size_t(j)]);
                std::snprintf(num, sizeof num, "%s%.6g", j ? "," : "", double(weights_[at + size_t(j)]));
                w += num;
            }
            line += "]";
            w += "]";
        }
        out_ << line << "]" << w << "]";
        if (n_pred_ > 0) {
            line = ",\"predicted\":[";
            for (int64_t l = 0; l < n_layer_; ++l) {
                const size_t at = (size_t(t) * size_t(n_layer_) + size_t(l)) * size_t(n_pred_);
                if (l) line += ",";
                if (!moe_[size_t(l)] || pred_[at] < 0) {
                    line += "null";
                    continue;
                }
                line += "[";
                for (int64_t j = 0; j < n_pred_; ++j) {
                    if (j) line += ',';
                    line += std::to_string(pred_[at + size_t(j)]);
                }
                line += "]";
            }
            out_ << line << "]";
        }
        out_ << "}\n";
    }
    out_.flush();
    if (!out_) throw Error(path_ + ": writing the routing trace failed");
    n_written_ += batch_.size();
    ++n_steps_;
}

namespace {

[[noreturn]] void bad(const std::string & name, size_t line, const std::string & what) {
    throw Error(name + ":" + std::to_string(line) + ": " + what);
}

int64_t get_int(const nlohmann::json & j, const char * key, int64_t lo, int64_t hi, const std::string & name, size_t line) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer()) bad(name, line, std::string("\"") + key + "\" must be an integer");
    const int64_t v = it->get<int64_t>();
    if (v < lo || v > hi)
        bad(name, line, std::string("\"") + key + "\" is " + std::to_string(v) + ", outside [" + std::to_string(lo) + ", " +
                            std::to_string(hi) + "]");
    return v;
}

} // namespace

RouteTrace parse_route_trace(const std::string & text, const std::string & name) {
    RouteTrace t;
    std::istringstream in(text);
    std::string s;
    size_t line = 0;
    bool header = false;
    while (std::getline(in, s)) {
        ++line;
        if (s.empty()) continue;
        nlohmann::json j = nlohmann::json::parse(s, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded() || !j.is_object()) bad(name, line, "not a JSON object");
        if (!header) {
            if (get_int(j, "moesh_route_trace", 1, 1, name, line) != 1) bad(name, line, "unknown trace version");
            auto m = j.find("model");
            if (m == j.end() || !m->is_string()) bad(name, line, "\"model\" must be a string");
            t.model = m->get<std::string>();
            t.n_layer = get_int(j, "n_layer", 1, 4096, name, line);
            t.n_expert = get_int(j, "n_expert", 0, 65536, name, line);
            t.n_expert_used = get_int(j, "n_expert_used", t.n_expert ? 1 : 0, std::max<int64_t>(t.n_expert, 0), name, line);
            auto ml = j.find("moe_layers");
            if (ml == j.end() || !ml->is_array() || ml->size() != size_t(t.n_layer))
                bad(name, line, "\"moe_layers\" must be an array of n_layer booleans");
            for (const auto & b : *ml) {
                if (!b.is_boolean()) bad(name, line, "\"moe_layers\" must hold booleans");
                t.moe_layers.push_back(b.get<bool>());
                if (t.moe_layers.back() && t.n_expert == 0) bad(name, line, "a MoE layer in a model without experts");
            }
            if (j.contains("n_predicted")) t.n_predicted = get_int(j, "n_predicted", 1, std::max<int64_t>(t.n_expert, 1), name, line);
            if (t.n_predicted > 0 && t.n_expert == 0) bad(name, line, "\"n_predicted\" in a model without experts");
            header = true;
            continue;
        }
        RouteTrace::Token tok;
        tok.seq = int32_t(get_int(j, "seq", 0, INT32_MAX, name, line));
        tok.pos = int32_t(get_int(j, "pos", 0, INT32_MAX, name, line));
        tok.token = int32_t(get_int(j, "token", 0, INT32_MAX, name, line));
        const bool has_step = j.contains("step");
        if (t.tokens.empty()) t.has_steps = has_step;
        if (has_step != t.has_steps)
            bad(name, line, t.has_steps ? "\"step\" is missing (earlier token lines have it)"
                                        : "\"step\" appears, but the first token line has none");
        if (has_step) {
            tok.step = get_int(j, "step", 0, INT64_MAX, name, line);
            if (!t.tokens.empty() && tok.step < t.tokens.back().step)
                bad(name, line, "\"step\" is " + std::to_string(tok.step) + ", before the previous line's " +
                                    std::to_string(t.tokens.back().step) + " (steps never go back)");
        } else {
            tok.step = int64_t(t.tokens.size());
        }
        auto e = j.find("experts");
        auto w = j.find("weights");
        if (e == j.end() || w == j.end() || !e->is_array() || !w->is_array() || e->size() != size_t(t.n_layer) ||
            w->size() != size_t(t.n_layer))
            bad(name, line, "\"experts\" and \"weights\" must be arrays of n_layer entries");
        for (int64_t l = 0; l < t.n_layer; ++l) {
            const auto & el = (*e)[size_t(l)];
            const auto & wl = (*w)[size_t(l)];
            const std::string where = "layer " + std::to_string(l) + ": ";
            if (!t.moe_layers[size_t(l)]) {
                if (!el.is_null() || !wl.is_null()) bad(name, line, where + "a dense layer must be null");
                for (int64_t k = 0; k < t.n_expert_used; ++k) {
                    t.experts.push_back(-1);
                    t.weights.push_back(0.0f);
                }
                continue;
            }
            if (!el.is_array() || !wl.is_array() || el.size() != size_t(t.n_expert_used) || wl.size() != el.size())
                bad(name, line, where + "experts and weights must hold n_expert_used entries");
            for (size_t k = 0; k < el.size(); ++k) {
                if (!el[k].is_number_integer() || el[k].get<int64_t>() < 0 || el[k].get<int64_t>() >= t.n_expert)
                    bad(name, line, where + "expert ids must be integers in [0, n_expert)");
                if (!wl[k].is_number() || !std::isfinite(wl[k].get<double>()) || wl[k].get<double>() < 0)
                    bad(name, line, where + "weights must be finite and >= 0");
                const int32_t id = int32_t(el[k].get<int64_t>());
                for (size_t p = 0; p < k; ++p)
                    if (el[p].get<int64_t>() == id) bad(name, line, where + "expert " + std::to_string(id) + " chosen twice");
                t.experts.push_back(id);
                t.weights.push_back(wl[k].get<float>());
            }
        }
        if (t.n_predicted > 0) {
            auto p = j.find("predicted");
            if (p == j.end() || !p->is_array() || p->size() != size_t(t.n_layer))
                bad(name, line, "\"predicted\" must be an array of n_layer entries (the header has \"n_predicted\")");
            for (int64_t l = 0; l < t.n_layer; ++l) {
                const auto & pl = (*p)[size_t(l)];
                const std::string where = "layer " + std::to_string(l) + ": ";
                if (pl.is_null()) {
                    for (int64_t k = 0; k < t.n_predicted; ++k) t.predicted.push_back(-1);
                    continue;
                }
                if (!t.moe_layers[size_t(l)]) bad(name, line, where + "a dense layer's prediction must be null");
                if (!pl.is_array() || pl.size() != size_t(t.n_predicted))
                    bad(name, line, where + "a prediction must be null or hold n_predicted expert ids");
                for (size_t k = 0; k < pl.size(); ++k) {
                    if (!pl[k].is_number_integer() || pl[k].get<int64_t>() < 0 || pl[k].get<int64_t>() >= t.n_expert)
                        bad(name, line, where + "predicted expert ids must be integers in [0, n_expert)");
                    const int32_t id = int32_t(pl[k].get<int64_t>());
                    for (size_t q = 0; q < k; ++q)
                        if (pl[q].get<int64_t>() == id) bad(name, line, where + "expert " + std::to_string(id) + " predicted twice");
                    t.predicted.push_back(id);
                }
            }
        } else if (j.contains("predicted")) {
            bad(name, line, "\"predicted\" without \"n_predicted\" in the header");
        }
        t.tokens.push_back(tok);
    }
    if (!header) bad(name, line, "no header line (an empty file?)");
    return t;
}

TraceReplay trace_requests(const RouteTrace & t, bool by_step, int64_t n_predicted) {
    TraceReplay r;
    n_predicted = std::min(n_predicted, t.n_predicted);
    std::vector<std::pair<int64_t, int32_t>> votes;   // (-count, expert), sorted
    auto ranked = [&](size_t i0, size_t i1, int64_t l, bool predicted, std::vector<int32_t> & out) {
        votes.assign(size_t(t.n_expert), {0, 0});
        for (int64_t e = 0; e < t.n_expert; ++e) votes[size_t(e)].second = int32_t(e);
        for (size_t i = i0; i < i1; ++i) {
            const int32_t * ids = predicted ? t.predicted_of(i, l) : t.experts_of(i, l);
            if (!ids) continue;
            for (int64_t k = 0; k < (predicted ? n_predicted : t.n_expert_used); ++k) --votes[size_t(ids[k])].first;
        }
        std::sort(votes.begin(), votes.end());
        out.clear();
        for (const auto & [neg, e] : votes)
            if (neg < 0) out.push_back(e);
    };
    std::vector<int32_t> ids;
    for (size_t i0 = 0; i0 < t.tokens.size();) {
        size_t i1 = i0 + 1;
        while (by_step && i1 < t.tokens.size() && t.tokens[i1].step == t.tokens[i0].step) ++i1;
        const int64_t step = by_step ? r.n_steps : int64_t(i0);
        for (int64_t l = 0; l < t.n_layer; ++l) {
            if (!t.moe_layers[size_t(l)]) continue;
            if (by_step) {
                ranked(i0, i1, l, false, ids);
                for (int32_t e : ids) r.requests.push_back({step, int32_t(l), e});
            } else {
                const int32_t * e = t.experts_of(i0, l);
                for (int64_t k = 0; k < t.n_expert_used; ++k) r.requests.push_back({step, int32_t(l), e[k]});
            }
            if (n_predicted <= 0) continue;
            if (by_step) {
                ranked(i0, i1, l, true, ids);
                if (!ids.empty()) r.predictions.push_back({step, int32_t(l), ids});
            } else if (const int32_t * p = t.predicted_of(i0, l)) {
                r.predictions.push_back({step, int32_t(l), std::vector<int32_t>(p, p + n_predicted)});
            }
        }
        ++r.n_steps;
        i0 = i1;
    }
    return r;
}

RouteTrace read_route_trace(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        throw Error(path + ": cannot open the routing trace (" + std::strerror(errno) +
                    "); write one with `moesh run --prompt TEXT --trace FILE` or `moesh perplexity ... --trace FILE`");
    std::ostringstream ss;
    ss << in.rdbuf();
    return parse_route_trace(ss.str(), path);
}

} // namespace moesh
