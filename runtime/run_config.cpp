#include "runtime/run_config.h"

#include "runtime/error.h"
#include "runtime/mapped_file.h"

#include <toml++/toml.h>

#include <filesystem>

namespace moesh {

namespace {

std::string where(std::string_view source, const toml::source_region & r) {
    return std::string(source) + ":" + std::to_string(r.begin.line) + ":" + std::to_string(r.begin.column);
}

[[noreturn]] void fail(std::string_view source, const toml::node & n, const std::string & key, const std::string & what) {
    throw Error(where(source, n.source()) + ": key '" + key + "': " + what);
}

std::vector<std::string> string_list(std::string_view source, const toml::node & n, const std::string & key) {
    const toml::array * arr = n.as_array();
    if (!arr) fail(source, n, key, "expected an array of strings");
    std::vector<std::string> out;
    for (const toml::node & v : *arr) {
        auto s = v.value<std::string>();
        if (!v.is_string() || !s) fail(source, v, key, "expected a string");
        out.push_back(*s);
    }
    return out;
}

int64_t integer(std::string_view source, const toml::node & n, const std::string & key, int64_t min, int64_t max) {
    if (!n.is_integer()) fail(source, n, key, "expected an integer");
    int64_t v = n.as_integer()->get();
    if (v < min || v > max)
        fail(source, n, key, "value " + std::to_string(v) + " out of range [" + std::to_string(min) + ", " + std::to_string(max) + "]");
    return v;
}

} // namespace

RunConfig parse_run_config(std::string_view text, std::string_view source) {
    toml::table root;
    try {
        root = toml::parse(text, source);
    } catch (const toml::parse_error & e) {
        throw Error(where(source, e.source()) + ": " + std::string(e.description()));
    }
    RunConfig rc;
    for (auto && [section_key, section] : root) {
        const std::string sname(section_key.str());
        const toml::table * tbl = section.as_table();
        if (!tbl) fail(source, section, sname, "expected a table ([plugins] or [runtime])");
        if (sname == "plugins") {
            for (auto && [k, v] : *tbl) {
                const std::string key = sname + "." + std::string(k.str());
                if (k == "dirs") {
                    rc.plugin_dirs = string_list(source, v, key);
                } else if (k == "allowed") {
                    rc.allowed_plugins = string_list(source, v, key);
                } else if (k == "preferred") {
                    auto s = v.value<std::string>();
                    if (!v.is_string() || !s) fail(source, v, key, "expected a string");
                    rc.preferred_plugin = *s;
                } else {
                    fail(source, v, key, "unknown key (known: dirs, allowed, preferred)");
                }
            }
        } else if (sname == "runtime") {
            for (auto && [k, v] : *tbl) {
                const std::string key = sname + "." + std::string(k.str());
                if (k == "threads") {
                    rc.threads = int32_t(integer(source, v, key, 0, 1024));
                } else if (k == "max_batch") {
                    rc.max_batch = integer(source, v, key, 1, 1 << 16);
                } else if (k == "kv_block_size") {
                    rc.kv_block_size = integer(source, v, key, 1, 1 << 16);
                } else if (k == "activations") {
                    auto s = v.value<std::string>();
                    if (!v.is_string() || !s || (*s != "fast" && *s != "precise"))
                        fail(source, v, key, "expected \"fast\" (8-bit, as llama.cpp) or \"precise\"");
                    rc.precise_activations = *s == "precise";
                } else if (k == "repack") {
                    auto b = v.value<bool>();
                    if (!v.is_boolean() || !b) fail(source, v, key, "expected true or false");
                    rc.repack = *b;
                } else {
                    fail(source, v, key, "unknown key (known: threads, max_batch, kv_block_size, activations, repack)");
                }
            }
        } else if (sname == "quantize") {
            for (auto && [k, v] : *tbl) {
                const std::string key = sname + "." + std::string(k.str());
                std::optional<moesh_dtype> * slot = k == "experts"      ? &rc.quantize.experts
                                                    : k == "attention"  ? &rc.quantize.attention
                                                    : k == "ffn"        ? &rc.quantize.ffn
                                                    : k == "embeddings" ? &rc.quantize.embeddings
                                                    : k == "output"     ? &rc.quantize.output
                                                                        : nullptr;
                if (!slot) fail(source, v, key, "unknown key (known: experts, attention, ffn, embeddings, output)");
                auto s = v.value<std::string>();
                if (!v.is_string() || !s) fail(source, v, key, std::string("expected a string (") + k_quant_targets + ")");
                *slot = parse_quant_target(*s);
                if (!*slot)
                    fail(source, v, key, "unknown quantization type " + quote_untrusted(*s, true) + " (supported: " +
                                             k_quant_targets + ")");
            }
        } else {
            fail(source, section, sname, "unknown table (known: [plugins], [runtime], [quantize])");
        }
    }
    return rc;
}

RunConfig load_run_config(const std::string & path) {
    RunConfig rc = parse_run_config(read_text_file(path, "the config file"), path);
    const std::filesystem::path base = std::filesystem::path(path).parent_path();
    for (auto & d : rc.plugin_dirs)
        if (std::filesystem::path(d).is_relative()) d = (base / d).lexically_normal().string();
    return rc;
}

} // namespace moesh
