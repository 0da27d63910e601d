#include "runtime/heatmap.h"

#include "runtime/error.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numbers>
#include <stdexcept>

namespace moesh {

int64_t ExpertActivations::layer_total(int64_t layer) const {
    int64_t sum = 0;
    for (int64_t c : counts[size_t(layer)]) sum += c;
    return sum;
}

ExpertActivations count_activations(const RouteTrace & t) {
    const size_t n_tokens = t.tokens.size();
    if (t.moe_layers.size() != size_t(t.n_layer) ||
        t.experts.size() != n_tokens * size_t(t.n_layer) * size_t(t.n_expert_used))
        throw std::invalid_argument("route trace: moe_layers or experts do not match n_layer, n_expert_used and the tokens");
    ExpertActivations a;
    a.model = t.model;
    a.n_layer = t.n_layer;
    a.n_expert = t.n_expert;
    a.n_expert_used = t.n_expert_used;
    a.n_tokens = int64_t(n_tokens);
    a.counts.resize(size_t(t.n_layer));
    for (int64_t l = 0; l < t.n_layer; ++l)
        if (t.moe_layers[size_t(l)]) a.counts[size_t(l)].assign(size_t(t.n_expert), 0);
    for (size_t i = 0; i < n_tokens; ++i)
        for (int64_t l = 0; l < t.n_layer; ++l) {
            if (!t.moe_layers[size_t(l)]) continue;
            const int32_t * e = t.experts_of(i, l);
            for (int64_t k = 0; k < t.n_expert_used; ++k) {
                if (e[k] < 0 || e[k] >= t.n_expert)
                    throw std::invalid_argument("route trace: token " + std::to_string(i) + ", layer " + std::to_string(l) +
                                                ": expert " + std::to_string(e[k]) + " outside [0, " +
                                                std::to_string(t.n_expert) + ")");
                ++a.counts[size_t(l)][size_t(e[k])];
            }
        }
    return a;
}

namespace {

struct LinearRgb {
    double r, g, b;
};

// OKLab (Ottosson, 2020) to linear-light sRGB, from its published matrices.
LinearRgb oklab_to_linear_srgb(double L, double a, double b) {
    const double l = std::pow(L + 0.3963377774 * a + 0.2158037573 * b, 3);
    const double m = std::pow(L - 0.1055613458 * a - 0.0638541728 * b, 3);
    const double s = std::pow(L - 0.0894841775 * a - 1.2914855480 * b, 3);
    return {+4.0767416621 * l - 3.3077115913 * m + 0.2309699292 * s,
            -1.2684380046 * l + 2.6097574011 * m - 0.3413193965 * s,
            -0.0041960863 * l - 0.7034186147 * m + 1.7076147010 * s};
}

bool in_srgb_gamut(const LinearRgb & c) {
    const double eps = 1e-7;
    return c.r >= -eps && c.r <= 1 + eps && c.g >= -eps && c.g <= 1 + eps && c.b >= -eps && c.b <= 1 + eps;
}

uint8_t srgb8(double linear) {
    const double c = std::clamp(linear, 0.0, 1.0);
    const double v = c <= 0.0031308 ? 12.92 * c : 1.055 * std::pow(c, 1.0 / 2.4) - 0.055;
    return uint8_t(std::lround(v * 255.0));
}

// Numbers in attributes: at most two decimals, no trailing zeros, "C" locale.
std::string num(double v) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%.2f", v);
    std::string s(buf);
    while (s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
    return s == "-0" ? "0" : s;
}

std::string hex(Rgb c) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "#%02x%02x%02x", c.r, c.g, c.b);
    return buf;
}

std::string percent(double share) {
    char buf[32];
    const double p = share * 100.0;
    std::snprintf(buf, sizeof buf, p > 0 && p < 1 ? "%.2f%%" : "%.1f%%", p);
    return buf;
}

size_t utf8_chars(std::string_view s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

// Label every step-th row or column, step a power of two, so labels stay min_px apart.
int64_t label_step(double pitch, double min_px) {
    int64_t step = 1;
    while (double(step) * pitch < min_px) step *= 2;
    return step;
}

} // namespace

// Why this scale: lightness (OKLab L) rises linearly with the value, so equal
// differences in share look equally different and the order still reads in
// greyscale and to colour-blind eyes; the hue turns as well (purple, blue, green,
// yellow) so that neighbouring values separate more than by lightness alone.
// OKLab is a space built so that such steps are perceptually even. Chroma is
// lowered where the colour would leave sRGB, which keeps lightness exact.
Rgb heat_colour(double t) {
    if (!(t >= 0.0)) t = 0.0;   // also NaN
    t = std::min(t, 1.0);
    const double L = 0.22 + 0.72 * t;
    const double hue = (300.0 - 200.0 * t) * std::numbers::pi / 180.0;
    auto at = [&](double chroma) { return oklab_to_linear_srgb(L, chroma * std::cos(hue), chroma * std::sin(hue)); };
    double lo = 0.0, hi = 0.13;
    if (in_srgb_gamut(at(hi))) {
        lo = hi;
    } else {
        for (int i = 0; i < 30; ++i) {
            const double mid = 0.5 * (lo + hi);
            (in_srgb_gamut(at(mid)) ? lo : hi) = mid;
        }
    }
    const LinearRgb c = at(lo);
    return {srgb8(c.r), srgb8(c.g), srgb8(c.b)};
}

std::string xml_escape(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (char ch : text) {
        const unsigned char c = static_cast<unsigned char>(ch);
        switch (ch) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        case '\'': out += "&apos;"; break;
        default: out += (c < 0x20 && ch != '\t' && ch != '\n' && ch != '\r') || c == 0x7f ? '?' : ch;
        }
    }
    return out;
}

std::string heatmap_svg(const ExpertActivations & a) {
    // Cells shrink so that the grid stays within about 1024 x 720 px (48 layers x
    // 128 experts: 8 x 15 px cells), and grow to at most 32 px for small models.
    const double cell_w = std::min(32.0, 1024.0 / double(std::max<int64_t>(a.n_expert, 1)));
    const double cell_h = std::clamp(720.0 / double(std::max<int64_t>(a.n_layer, 1)), 8.0, 32.0);
    const double grid_w = cell_w * double(a.n_expert), grid_h = cell_h * double(a.n_layer);
    const double left = 72, top = 92;
    const double bar_x = left + grid_w + 28, bar_w = 14, bar_h = std::clamp(grid_h, 160.0, 360.0);

    double max_share = 0;
    int64_t n_moe = 0;
    for (int64_t l = 0; l < a.n_layer; ++l) {
        if (a.dense(l)) continue;
        ++n_moe;
        const int64_t total = a.layer_total(l);
        for (int64_t c : a.counts[size_t(l)])
            if (total > 0) max_share = std::max(max_share, double(c) / double(total));
    }
    const double uniform = a.n_expert > 0 ? 1.0 / double(a.n_expert) : 0.0;

    const std::string model = xml_escape(a.model);
    const std::string title = model + ": expert activations per layer, " + std::to_string(a.n_tokens) + " tokens";
    const std::string subtitle = "top-" + std::to_string(a.n_expert_used) + " of " + std::to_string(a.n_expert) +
                                 " experts in " + std::to_string(n_moe) + " of " + std::to_string(a.n_layer) +
                                 " layers; colour: the expert's share of its layer's activations";
    const std::string caption = "The black line on the colour bar marks uniform routing, 1/" + std::to_string(a.n_expert) +
                                " of a layer's activations per expert; hover a cell for its numbers." +
                                (n_moe < a.n_layer ? " Grey rows are dense layers." : "");
    // Text widths are estimated (no font metrics here): about 0.55 em per character.
    const double width = std::ceil(std::max({bar_x + bar_w + 96, 32 + 0.55 * 16 * double(utf8_chars(title)),
                                             32 + 0.55 * 12 * double(utf8_chars(subtitle)),
                                             32 + 0.55 * 11 * double(utf8_chars(caption))}));
    const double body_h = std::max(grid_h, bar_h);
    const double height = std::ceil(top + body_h + 44);

    std::string s;
    s.reserve(size_t(a.n_layer * a.n_expert) * 110 + 4096);
    s += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    s += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(width) + "\" height=\"" + num(height) +
         "\" viewBox=\"0 0 " + num(width) + " " + num(height) + "\" font-family=\"sans-serif\" fill=\"#222222\">\n";
    s += "<title>" + title + "</title>\n";
    s += "<defs><linearGradient id=\"moesh-heat\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
    // SVG interpolates gradients in sRGB; enough stops keep the bar on the scale's curve.
    for (int i = 0; i <= 16; ++i)
        s += "<stop offset=\"" + num(i / 16.0) + "\" stop-color=\"" + hex(heat_colour(i / 16.0)) + "\"/>";
    s += "</linearGradient></defs>\n";
    s += "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n";
    s += "<text x=\"16\" y=\"28\" font-size=\"16\" font-weight=\"bold\">" + title + "</text>\n";
    s += "<text x=\"16\" y=\"48\" font-size=\"12\" fill=\"#555555\">" + subtitle + "</text>\n";

    // Axes: experts across the top, layers down the left.
    s += "<text x=\"" + num(left + grid_w / 2) + "\" y=\"" + num(top - 22) +
         "\" font-size=\"12\" text-anchor=\"middle\">expert</text>\n";
    s += "<text transform=\"translate(20 " + num(top + grid_h / 2) +
         ") rotate(-90)\" font-size=\"12\" text-anchor=\"middle\">layer</text>\n";
    s += "<g font-size=\"10\" text-anchor=\"middle\">";
    for (int64_t e = 0; e < a.n_expert; e += label_step(cell_w, 22))
        s += "<text x=\"" + num(left + (double(e) + 0.5) * cell_w) + "\" y=\"" + num(top - 6) + "\">" + std::to_string(e) +
             "</text>";
    s += "</g>\n<g font-size=\"10\" text-anchor=\"end\">";
    for (int64_t l = 0; l < a.n_layer; l += label_step(cell_h, 11))
        s += "<text x=\"" + num(left - 6) + "\" y=\"" + num(top + (double(l) + 0.5) * cell_h + 3.5) + "\">" +
             std::to_string(l) + "</text>";
    s += "</g>\n";

    // One cell per (layer, expert), dense layers included, each with its tooltip.
    s += "<g shape-rendering=\"crispEdges\"";
    if (std::min(cell_w, cell_h) >= 6) s += " stroke=\"#ffffff\" stroke-width=\"0.5\"";
    s += ">\n";
    const std::string wh = "\" width=\"" + num(cell_w) + "\" height=\"" + num(cell_h) + "\" fill=\"";
    for (int64_t l = 0; l < a.n_layer; ++l) {
        const std::string y = num(top + double(l) * cell_h);
        const int64_t total = a.layer_total(l);
        for (int64_t e = 0; e < a.n_expert; ++e) {
            s += "<rect class=\"cell";
            s += a.dense(l) ? " dense" : "";
            s += "\" x=\"" + num(left + double(e) * cell_w) + "\" y=\"" + y + wh;
            if (a.dense(l)) {
                s += "#d4d4d4\"><title>layer " + std::to_string(l) + ": dense, no routed experts</title></rect>\n";
                continue;
            }
            const int64_t c = a.counts[size_t(l)][size_t(e)];
            const double share = total > 0 ? double(c) / double(total) : 0.0;
            s += hex(heat_colour(max_share > 0 ? share / max_share : 0.0)) + "\"><title>layer " + std::to_string(l) +
                 " expert " + std::to_string(e) + ": " + std::to_string(c) + (c == 1 ? " token (" : " tokens (") +
                 percent(share) + ")</title></rect>\n";
        }
    }
    s += "</g>\n";
    const double dense_font = std::min(11.0, cell_h - 1);
    for (int64_t l = 0; l < a.n_layer; ++l)
        if (a.dense(l) && a.n_expert > 0)
            s += "<text x=\"" + num(left + grid_w / 2) + "\" y=\"" + num(top + (double(l) + 0.5) * cell_h + dense_font * 0.35) +
                 "\" font-size=\"" + num(dense_font) + "\" text-anchor=\"middle\" fill=\"#444444\">dense</text>\n";

    // Colour bar: 0 at the bottom, the largest share in the picture at the top.
    const double range = max_share > 0 ? max_share : 1.0;
    s += "<text x=\"" + num(bar_x) + "\" y=\"" + num(top - 22) + "\" font-size=\"12\">share</text>\n";
    s += "<rect x=\"" + num(bar_x) + "\" y=\"" + num(top) + "\" width=\"" + num(bar_w) + "\" height=\"" + num(bar_h) +
         "\" fill=\"url(#moesh-heat)\" stroke=\"#888888\" stroke-width=\"0.5\"/>\n";
    // Ticks at 0, half and the top; the uniform share gets its own labelled mark, and a
    // tick label that would overlap that label is left out.
    const bool show_uniform = uniform > 0 && uniform <= range;
    const double uniform_y = top + bar_h * (1 - uniform / range);
    s += "<g font-size=\"10\">";
    for (double f : {1.0, 0.5, 0.0}) {
        const double y = top + bar_h * (1 - f);
        s += "<line x1=\"" + num(bar_x + bar_w) + "\" y1=\"" + num(y) + "\" x2=\"" + num(bar_x + bar_w + 3) + "\" y2=\"" +
             num(y) + "\" stroke=\"#444444\"/>";
        if (!show_uniform || std::abs(y - uniform_y) >= 12)
            s += "<text x=\"" + num(bar_x + bar_w + 5) + "\" y=\"" + num(y + 3.5) + "\">" + percent(f * max_share) + "</text>";
    }
    if (show_uniform)
        s += "<line x1=\"" + num(bar_x - 4) + "\" y1=\"" + num(uniform_y) + "\" x2=\"" + num(bar_x + bar_w + 3) + "\" y2=\"" +
             num(uniform_y) + "\" stroke=\"#000000\" stroke-width=\"1.5\"/><text x=\"" + num(bar_x + bar_w + 5) + "\" y=\"" +
             num(uniform_y + 3.5) + "\" font-weight=\"bold\">" + percent(uniform) + " = 1/" + std::to_string(a.n_expert) +
             "</text>";
    s += "</g>\n";
    s += "<text x=\"16\" y=\"" + num(top + body_h + 28) + "\" font-size=\"11\" fill=\"#555555\">" + caption + "</text>\n";
    s += "</svg>\n";
    return s;
}

void write_heatmap_svg(const ExpertActivations & a, const std::string & path) {
    const std::string svg = heatmap_svg(a);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(path + ": cannot create the file (does its folder exist, and may you write there?)");
    out.write(svg.data(), std::streamsize(svg.size()));
    out.close();
    if (!out) throw Error(path + ": writing the heat map failed (is the disk full?)");
}

} // namespace moesh
