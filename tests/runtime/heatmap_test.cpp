// Expert activation heat maps: counts worked out by hand from a small trace, and
// an SVG that is well-formed XML with one cell per (layer, expert).
#include "runtime/error.h"
#include "runtime/heatmap.h"
#include "runtime/route_trace.h"
#include "xml_check.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <regex>

namespace moesh {
namespace {

// 3 layers (layer 1 dense), 4 experts, top-2, 3 tokens.
std::string hand_trace(const std::string & model_json = "\"hand\"") {
    return "{\"moesh_route_trace\": 1, \"model\": " + model_json +
           ", \"n_layer\": 3, \"n_expert\": 4, \"n_expert_used\": 2, \"moe_layers\": [true, false, true]}\n"
           "{\"seq\": 0, \"pos\": 0, \"token\": 5, \"experts\": [[0, 1], null, [2, 3]], \"weights\": [[0.6, 0.4], null, [0.5, 0.5]]}\n"
           "{\"seq\": 0, \"pos\": 1, \"token\": 6, \"experts\": [[1, 0], null, [3, 0]], \"weights\": [[0.7, 0.3], null, [0.9, 0.1]]}\n"
           "{\"seq\": 0, \"pos\": 2, \"token\": 7, \"experts\": [[1, 2], null, [3, 1]], \"weights\": [[0.5, 0.5], null, [0.8, 0.2]]}\n";
}

size_t count_of(const std::string & text, const std::string & what) {
    size_t n = 0;
    for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + what.size())) ++n;
    return n;
}

std::string hex(Rgb c) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "#%02x%02x%02x", c.r, c.g, c.b);
    return buf;
}

// WCAG relative luminance of an 8-bit sRGB colour: an independent measure of lightness.
double luminance(Rgb c) {
    auto lin = [](uint8_t v) {
        const double x = v / 255.0;
        return x <= 0.04045 ? x / 12.92 : std::pow((x + 0.055) / 1.055, 2.4);
    };
    return 0.2126 * lin(c.r) + 0.7152 * lin(c.g) + 0.0722 * lin(c.b);
}

TEST(Heatmap, CountsEachLayersChoicesAndLeavesDenseLayersEmpty) {
    const ExpertActivations a = count_activations(parse_route_trace(hand_trace(), "hand.jsonl"));
    EXPECT_EQ(a.model, "hand");
    EXPECT_EQ(a.n_layer, 3);
    EXPECT_EQ(a.n_expert, 4);
    EXPECT_EQ(a.n_tokens, 3);
    ASSERT_EQ(a.counts.size(), 3u);
    // layer 0: expert 0 by tokens 0 and 1, expert 1 by all three, expert 2 by token 2, expert 3 by none
    EXPECT_EQ(a.counts[0], (std::vector<int64_t>{2, 3, 1, 0}));
    EXPECT_TRUE(a.dense(1));
    EXPECT_TRUE(a.counts[1].empty());
    EXPECT_EQ(a.counts[2], (std::vector<int64_t>{1, 1, 1, 3}));
    EXPECT_EQ(a.layer_total(0), 6);   // 3 tokens x top-2
    EXPECT_EQ(a.layer_total(1), 0);
    EXPECT_EQ(a.layer_total(2), 6);
}

TEST(Heatmap, RefusesAnExpertIdOutsideTheModel) {
    RouteTrace t = parse_route_trace(hand_trace(), "hand.jsonl");
    t.experts[1] = 4;   // token 0, layer 0, second choice
    EXPECT_THROW(count_activations(t), std::invalid_argument);
}

TEST(Heatmap, SvgIsWellFormedWithOneCellPerLayerAndExpert) {
    const ExpertActivations a = count_activations(parse_route_trace(hand_trace(), "hand.jsonl"));
    const std::string svg = heatmap_svg(a);
    EXPECT_EQ(test::xml_well_formed(svg), "");
    EXPECT_EQ(count_of(svg, "<rect class=\"cell"), 3u * 4u);
    EXPECT_EQ(count_of(svg, "<rect class=\"cell dense\""), 4u);
    EXPECT_NE(svg.find(">dense</text>"), std::string::npos);
    EXPECT_NE(svg.find("hand: expert activations per layer, 3 tokens"), std::string::npos);
    // Tooltips: count and share of the layer's 6 activations; the largest share (50%) takes
    // the top of the scale, an expert nobody chose the bottom.
    const std::string top = hex(heat_colour(1.0)), bottom = hex(heat_colour(0.0));
    EXPECT_NE(svg.find("fill=\"" + top + "\"><title>layer 0 expert 1: 3 tokens (50.0%)</title>"), std::string::npos) << svg;
    EXPECT_NE(svg.find("fill=\"" + bottom + "\"><title>layer 0 expert 3: 0 tokens (0.0%)</title>"), std::string::npos);
    EXPECT_NE(svg.find("<title>layer 0 expert 2: 1 token (16.7%)</title>"), std::string::npos);
    EXPECT_NE(svg.find("<title>layer 2 expert 3: 3 tokens (50.0%)</title>"), std::string::npos);
    EXPECT_NE(svg.find("<title>layer 1: dense, no routed experts</title>"), std::string::npos);
    // the colour bar's range: 0 to the largest share
    EXPECT_NE(svg.find(">50.0%</text>"), std::string::npos);
    EXPECT_NE(svg.find(">0.0%</text>"), std::string::npos);
}

TEST(Heatmap, EscapesTheModelName) {
    // JSON \u0001: a control character XML 1.0 cannot carry even as a reference
    const ExpertActivations a = count_activations(parse_route_trace(hand_trace("\"a<b&\\\"c'>\\u0001\""), "hand.jsonl"));
    EXPECT_EQ(a.model, "a<b&\"c'>\x01");
    const std::string svg = heatmap_svg(a);
    EXPECT_EQ(test::xml_well_formed(svg), "");
    EXPECT_EQ(svg.find("a<b"), std::string::npos);
    EXPECT_NE(svg.find("<title>a&lt;b&amp;&quot;c&apos;&gt;?: expert activations"), std::string::npos) << svg.substr(0, 800);
    EXPECT_EQ(xml_escape("x<y>&\"'\t\n"), "x&lt;y&gt;&amp;&quot;&apos;\t\n");
    EXPECT_EQ(xml_escape("caf\xc3\xa9"), "caf\xc3\xa9");   // UTF-8 passes through
}

// 48 layers x 128 experts: cells shrink so the picture stays about a screen wide, every
// layer keeps its label, and experts are labelled every few columns.
TEST(Heatmap, LargeModelsStayWithinAReadableWidth) {
    ExpertActivations a;
    a.model = "big";
    a.n_layer = 48;
    a.n_expert = 128;
    a.n_expert_used = 8;
    a.n_tokens = 1000;
    a.counts.assign(48, std::vector<int64_t>(128, 0));
    a.counts[5].clear();   // one dense layer
    for (int64_t l = 0; l < 48; ++l)
        for (int64_t e = 0; e < 128 && l != 5; ++e) a.counts[size_t(l)][size_t(e)] = (l * 7 + e * 13) % 120;
    const std::string svg = heatmap_svg(a);
    EXPECT_EQ(test::xml_well_formed(svg), "");
    EXPECT_EQ(count_of(svg, "<rect class=\"cell"), 48u * 128u);
    std::smatch m;
    ASSERT_TRUE(std::regex_search(svg, m, std::regex("<svg [^>]*width=\"([0-9.]+)\" height=\"([0-9.]+)\"")));
    EXPECT_LE(std::stod(m[1]), 1300.0);
    EXPECT_GE(std::stod(m[1]), 1000.0);
    EXPECT_LE(std::stod(m[2]), 1000.0);
    // expert labels: some, not all 128; layer labels: all 48 (plus "dense" once)
    const size_t start = svg.find("<g font-size=\"10\" text-anchor=\"middle\">");
    const size_t end = svg.find("</g>", start);
    const size_t n_expert_labels = count_of(svg.substr(start, end - start), "<text");
    EXPECT_GE(n_expert_labels, 16u);
    EXPECT_LT(n_expert_labels, 64u);
    const size_t lstart = svg.find("<g font-size=\"10\" text-anchor=\"end\">");
    EXPECT_EQ(count_of(svg.substr(lstart, svg.find("</g>", lstart) - lstart), "<text"), 48u);
    EXPECT_EQ(count_of(svg, ">dense</text>"), 1u);
}

// The scale's reason for being: it gets lighter at every step (by a luminance formula
// independent of the OKLab maths that builds it), from near black to near white.
TEST(Heatmap, ColourScaleGetsLighterAtEveryStep) {
    double prev = -1;
    for (int i = 0; i <= 64; ++i) {
        const double y = luminance(heat_colour(i / 64.0));
        EXPECT_GT(y, prev) << "step " << i;
        prev = y;
    }
    EXPECT_LT(luminance(heat_colour(0.0)), 0.05);
    EXPECT_GT(luminance(heat_colour(1.0)), 0.7);
    EXPECT_EQ(hex(heat_colour(-1.0)), hex(heat_colour(0.0)));
    EXPECT_EQ(hex(heat_colour(2.0)), hex(heat_colour(1.0)));
    EXPECT_EQ(hex(heat_colour(std::numeric_limits<double>::quiet_NaN())), hex(heat_colour(0.0)));
    // not a grey ramp: the ends differ in hue (purple-ish dark, yellow-ish light)
    const Rgb dark = heat_colour(0.0), light = heat_colour(1.0);
    EXPECT_GT(dark.b, dark.g);
    EXPECT_GT(light.r, light.b);
}

TEST(Heatmap, WritingToAMissingFolderNamesThePath) {
    const ExpertActivations a = count_activations(parse_route_trace(hand_trace(), "hand.jsonl"));
    try {
        write_heatmap_svg(a, "/nonexistent-moesh-dir/h.svg");
        ADD_FAILURE() << "no error";
    } catch (const Error & e) {
        EXPECT_NE(std::string(e.what()).find("/nonexistent-moesh-dir/h.svg: cannot create"), std::string::npos) << e.what();
    }
}

// The checker the SVG tests rely on must itself catch what it claims to.
TEST(Heatmap, XmlCheckRefusesMalformedDocuments) {
    EXPECT_EQ(test::xml_well_formed("<?xml version=\"1.0\"?>\n<a x='1' y=\"&lt;&#60;&#x3c;\">t &amp; u<b/><!-- c --></a>\n"), "");
    for (const char * bad : {"<a><b></a></b>", "<a>x & y</a>", "<a b=c/>", "<a b=\"1\" b=\"2\"/>", "<a/><b/>", "<a>",
                             "<a>\x01</a>", "<a b=\"<\"/>", "text", "<a>&nbsp;</a>", "<a b=\"1\"c=\"2\"/>", ""})
        EXPECT_NE(test::xml_well_formed(bad), "") << bad;
}

} // namespace
} // namespace moesh
