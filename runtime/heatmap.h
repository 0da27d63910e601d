// Expert activation heat maps: how often each layer's router chose each expert
// in a routing trace, and that matrix drawn as a self-contained SVG (layers
// down, experts across, colour = the expert's share of its layer's activations).
//
//   RouteTrace t = read_route_trace("trace.jsonl");
//   ExpertActivations a = count_activations(t);   // a.counts[layer][expert]
//   write_heatmap_svg(a, "heatmap.svg");           // heatmap_svg(a) gives the text
//
// Thread safety: pure functions; write_heatmap_svg touches only its file.
#pragma once

#include "runtime/route_trace.h"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moesh {

struct ExpertActivations {
    std::string model;
    int64_t n_layer = 0, n_expert = 0, n_expert_used = 0, n_tokens = 0;
    // [n_layer][n_expert]: tokens that chose expert e in layer l; an empty row for a dense layer
    std::vector<std::vector<int64_t>> counts;

    bool dense(int64_t layer) const { return counts[size_t(layer)].empty(); }
    // A layer's activations: n_tokens * n_expert_used for a MoE layer, 0 for a dense one.
    int64_t layer_total(int64_t layer) const;
};

// Throws std::invalid_argument for an expert id outside [0, n_expert) in a MoE
// layer (read_route_trace never returns one).
ExpertActivations count_activations(const RouteTrace & trace);

struct Rgb {
    uint8_t r = 0, g = 0, b = 0;
};
// The heat map's sequential colour scale at t in [0, 1] (clamped): dark purple
// at 0 through blue and green to light yellow at 1, lightness rising evenly.
Rgb heat_colour(double t);

// &, <, >, " and ' as entities; control characters XML 1.0 cannot carry as '?'.
std::string xml_escape(std::string_view text);

std::string heatmap_svg(const ExpertActivations & a);
// Throws moesh::Error naming the path when it cannot be written.
void write_heatmap_svg(const ExpertActivations & a, const std::string & path);

} // namespace moesh
