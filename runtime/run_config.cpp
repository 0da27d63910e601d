#include "runtime/run_config.h"

#include "runtime/kv_cache.h"

#include "runtime/error.h"
#include "runtime/mapped_file.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
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

std::string string_value(std::string_view source, const toml::node & n, const std::string & key) {
    auto s = n.value<std::string>();
    if (!n.is_string() || !s) fail(source, n, key, "expected a string");
    return *s;
}

IndexRange index_range(std::string_view source, const toml::node & n, const std::string & key) {
    const std::string s = string_value(source, n, key);
    if (s == "*") return {};
    IndexRange r;
    const size_t dash = s.find('-');
    try {
        size_t used = 0;
        r.first = std::stoll(s.substr(0, dash), &used);
        if (used != (dash == std::string::npos ? s.size() : dash)) throw std::invalid_argument(s);
        r.last = r.first;
        if (dash != std::string::npos) {
            r.last = std::stoll(s.substr(dash + 1), &used);
            if (used != s.size() - dash - 1) throw std::invalid_argument(s);
        }
    } catch (const std::exception &) {
        fail(source, n, key, "expected \"N\", \"A-B\" or \"*\", got " + quote_untrusted(s, true));
    }
    if (r.first < 0 || r.last < r.first) fail(source, n, key, "range " + s + " is empty or negative");
    return r;
}

void parse_tier(std::string_view source, const toml::node & n, PlacementConfig & pc) {
    const toml::table * t = n.as_table();
    if (!t) fail(source, n, "tier", "expected a table ([[tier]])");
    TierConfig tier;
    bool have_kind = false, have_budget = false;
    for (auto && [k, v] : *t) {
        const std::string key = "tier." + std::string(k.str());
        if (k == "name") {
            tier.name = string_value(source, v, key);
        } else if (k == "kind") {
            const std::string kind = string_value(source, v, key);
            if (kind == "gpu") tier.kind = TierKind::Gpu;
            else if (kind == "host") tier.kind = TierKind::Host;
            else if (kind == "disk") tier.kind = TierKind::Disk;
            else fail(source, v, key, "unknown tier kind " + quote_untrusted(kind, true) + " (gpu, host, disk)");
            have_kind = true;
        } else if (k == "budget") {
            if (v.is_integer() && v.as_integer()->get() > 0) {
                tier.budget = uint64_t(v.as_integer()->get());
            } else if (!v.is_string() || !parse_byte_size(*v.value<std::string>(), &tier.budget) || tier.budget == 0) {
                fail(source, v, key, "expected a positive size such as \"20GiB\", \"512MiB\" or a byte count");
            }
            have_budget = true;
        } else if (k == "device") {
            tier.device = int32_t(integer(source, v, key, 0, 1023));
        } else {
            fail(source, v, key, "unknown key (known: name, kind, budget, device)");
        }
    }
    if (!have_kind) fail(source, n, "tier", "missing 'kind' (gpu, host or disk)");
    if (tier.kind == TierKind::Disk && have_budget)
        fail(source, n, "tier.budget", "a disk tier has no budget: the model file holds every expert, and the host tier's "
                                       "budget bounds the memory its reads fill; remove the key");
    if (tier.kind != TierKind::Disk && !have_budget) fail(source, n, "tier", "missing 'budget' (bytes the tier may hold)");
    if (tier.name.empty()) tier.name = tier.kind == TierKind::Gpu ? "gpu" + std::to_string(tier.device)
                                       : tier.kind == TierKind::Host ? "host" : "disk";
    for (const TierConfig & o : pc.tiers)
        if (o.name == tier.name) fail(source, n, "tier.name", "a second tier named '" + tier.name + "'");
    pc.tiers.push_back(tier);
}

void parse_placement(std::string_view source, const toml::table & tbl, PlacementConfig & pc) {
    for (auto && [k, v] : tbl) {
        const std::string key = "placement." + std::string(k.str());
        if (k == "policy") {
            pc.policy = string_value(source, v, key);
            if (pc.policy != "static" && pc.policy != "lru" && pc.policy != "lfu" && pc.policy != "heat" && pc.policy != "lookahead")
                fail(source, v, key, "unknown policy " + quote_untrusted(pc.policy, true) + " (static, lru, lfu, heat, lookahead)");
        } else if (k == "heat_decay") {
            auto d = v.value<double>();
            if (!(v.is_floating_point() || v.is_integer()) || !d || !(*d > 0.0 && *d <= 1.0))
                fail(source, v, key, "expected a number in (0, 1]");
            pc.heat_decay = *d;
        } else if (k == "prefetch") {
            auto b = v.value<bool>();
            if (!v.is_boolean() || !b) fail(source, v, key, "expected true or false");
            pc.prefetch = *b;
        } else if (k == "prefetch_min_precision") {
            auto d = v.value<double>();
            if (!(v.is_floating_point() || v.is_integer()) || !d || !(*d >= 0.0 && *d <= 1.0))
                fail(source, v, key, "expected a number in [0, 1]");
            pc.prefetch_min_precision = *d;
        } else if (k == "prefetch_extra") {
            pc.prefetch_extra = int32_t(integer(source, v, key, 0, 64));
        } else if (k == "direct_io") {
            auto b = v.value<bool>();
            if (!v.is_boolean() || !b) fail(source, v, key, "expected true or false");
            pc.direct_io = *b;
        } else if (k == "pin") {
            const toml::array * arr = v.as_array();
            if (!arr) fail(source, v, key, "expected [[placement.pin]] tables");
            for (const toml::node & p : *arr) {
                const toml::table * pt = p.as_table();
                if (!pt) fail(source, p, key, "expected a table");
                PinConfig pin;
                for (auto && [pk, pv] : *pt) {
                    const std::string pkey = key + "." + std::string(pk.str());
                    if (pk == "tier") pin.tier = string_value(source, pv, pkey);
                    else if (pk == "layers") pin.layers = index_range(source, pv, pkey);
                    else if (pk == "experts") pin.experts = index_range(source, pv, pkey);
                    else fail(source, pv, pkey, "unknown key (known: tier, layers, experts)");
                }
                if (pin.tier.empty()) fail(source, p, key, "missing 'tier'");
                pc.pins.push_back(pin);
            }
        } else {
            fail(source, v, key, "unknown key (known: policy, heat_decay, prefetch, prefetch_min_precision, prefetch_extra, direct_io, pin)");
        }
    }
}

} // namespace

bool parse_host_port(std::string_view text, std::string * address, uint16_t * port) {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size() || text.size() - colon - 1 > 5) return false;
    std::string_view host = text.substr(0, colon), digits = text.substr(colon + 1);
    if (host.front() == '[') {   // [::1]:8080
        if (host.size() < 3 || host.back() != ']') return false;
        host = host.substr(1, host.size() - 2);
    }
    unsigned p = 0;
    for (char c : digits) {
        if (c < '0' || c > '9') return false;
        p = p * 10 + unsigned(c - '0');
    }
    if (p > 65535) return false;
    for (char c : host)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == ':' || c == '-')) return false;
    *address = std::string(host);
    *port = uint16_t(p);
    return true;
}

bool parse_byte_size(std::string_view text, uint64_t * out) {
    std::string s(text);
    size_t used = 0;
    double v = 0;
    try {
        v = std::stod(s, &used);
    } catch (const std::exception &) {
        return false;
    }
    std::string unit = s.substr(used);
    while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
    double mul = 0;
    if (unit.empty() || unit == "B") mul = 1;
    else if (unit == "KiB") mul = 1024.0;
    else if (unit == "MiB") mul = 1024.0 * 1024;
    else if (unit == "GiB") mul = 1024.0 * 1024 * 1024;
    else if (unit == "TiB") mul = 1024.0 * 1024 * 1024 * 1024;
    else if (unit == "KB") mul = 1e3;
    else if (unit == "MB") mul = 1e6;
    else if (unit == "GB") mul = 1e9;
    else if (unit == "TB") mul = 1e12;
    else return false;
    const double bytes = v * mul;
    if (!(bytes >= 0) || bytes > 1.8e19) return false;
    *out = uint64_t(bytes);
    return true;
}

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
        if (sname == "tier") {
            const toml::array * arr = section.as_array();
            if (!arr) fail(source, section, sname, "expected [[tier]] tables");
            for (const toml::node & t : *arr) parse_tier(source, t, rc.placement);
            continue;
        }
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
                } else if (k == "kv_type") {
                    auto s = v.value<std::string>();
                    if (!v.is_string() || !s || (*s != "auto" && parse_kv_type(*s) < 0))
                        fail(source, v, key, "expected \"auto\", \"f16\" (half the KV cache's memory), \"q8_0\" (0.27 of it) or \"f32\"");
                    rc.kv_type = *s == "auto" ? -1 : parse_kv_type(*s);
                } else {
                    fail(source, v, key, "unknown key (known: threads, max_batch, kv_block_size, activations, repack, kv_type)");
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
        } else if (sname == "placement") {
            parse_placement(source, *tbl, rc.placement);
        } else if (sname == "server") {
            ServerConfig & sc = rc.server;
            for (auto && [k, v] : *tbl) {
                const std::string key = sname + "." + std::string(k.str());
                if (k == "endpoint") {
                    sc.endpoint = string_value(source, v, key);
                    if (sc.endpoint.rfind("tcp://", 0) != 0 && sc.endpoint.rfind("ipc://", 0) != 0)
                        fail(source, v, key, "expected a ZeroMQ endpoint such as \"tcp://127.0.0.1:5555\" or \"ipc:///tmp/moesh\"");
                } else if (k == "max_sequences") {
                    sc.max_sequences = integer(source, v, key, 1, 4096);
                } else if (k == "kv_cache") {
                    if (v.is_integer() && v.as_integer()->get() > 0) sc.kv_cache = uint64_t(v.as_integer()->get());
                    else if (!v.is_string() || !parse_byte_size(*v.value<std::string>(), &sc.kv_cache) || sc.kv_cache == 0)
                        fail(source, v, key, "expected a positive size such as \"256MiB\" or a byte count");
                } else if (k == "kv_allocation") {
                    const std::string a = string_value(source, v, key);
                    if (a != "on_demand" && a != "up_front")
                        fail(source, v, key, "expected \"on_demand\" (blocks as a request grows; the newest request is preempted "
                                             "and recomputed when the pool is out) or \"up_front\" (prompt + max_tokens reserved at admission)");
                    sc.kv_up_front = a == "up_front";
                } else if (k == "prefill_chunk") {
                    sc.prefill_chunk = integer(source, v, key, 1, 1 << 16);
                } else if (k == "prefix_cache") {
                    if (!v.is_boolean()) fail(source, v, key, "expected true or false");
                    sc.prefix_cache = *v.value<bool>();
                } else if (k == "max_queue") {
                    sc.max_queue = integer(source, v, key, 0, 1 << 20);
                } else if (k == "max_tokens") {
                    sc.max_tokens = integer(source, v, key, 1, 1 << 24);
                } else if (k == "max_message_bytes") {
                    sc.max_message_bytes = integer(source, v, key, 256, int64_t(1) << 30);
                } else if (k == "send_hwm") {
                    sc.send_hwm = integer(source, v, key, 1, 1 << 24);
                } else if (k == "recv_hwm") {
                    sc.recv_hwm = integer(source, v, key, 1, 1 << 24);
                } else if (k == "drain_timeout_s") {
                    auto d = v.value<double>();
                    if (!(v.is_floating_point() || v.is_integer()) || !d || !(*d >= 0 && *d <= 86400))
                        fail(source, v, key, "expected seconds in [0, 86400]");
                    sc.drain_timeout_s = *d;
                } else if (k == "http") {
                    sc.http = string_value(source, v, key);
                    std::string a;
                    uint16_t port = 0;
                    if (!sc.http.empty() && !parse_host_port(sc.http, &a, &port))
                        fail(source, v, key, "expected \"ADDRESS:PORT\" such as \"127.0.0.1:8090\" (port 0: any free port), or \"\" for no HTTP");
                } else if (k == "http_max_connections") {
                    sc.http_max_connections = integer(source, v, key, 1, 1 << 20);
                } else if (k == "http_request_timeout_s") {
                    auto d = v.value<double>();
                    if (!(v.is_floating_point() || v.is_integer()) || !d || !(*d > 0 && *d <= 3600))
                        fail(source, v, key, "expected seconds in (0, 3600]");
                    sc.http_request_timeout_s = *d;
                } else if (k == "default_max_tokens") {
                    sc.default_max_tokens = integer(source, v, key, 1, 1 << 24);
                } else if (k == "log_interval_s") {
                    auto d = v.value<double>();
                    if (!(v.is_floating_point() || v.is_integer()) || !d || !(*d >= 0 && *d <= 86400))
                        fail(source, v, key, "expected seconds in [0, 86400] (0: no status lines)");
                    sc.log_interval_s = *d;
                } else if (k == "curve_secret_key" || k == "curve_authorized_keys" || k == "api_key_file") {
                    std::string & slot = k == "curve_secret_key" ? sc.curve_secret_key
                                         : k == "api_key_file"   ? sc.api_key_file
                                                                 : sc.curve_authorized_keys;
                    slot = string_value(source, v, key);
                    if (slot.empty()) fail(source, v, key, "expected a path (leave the key out for none)");
                } else {
                    fail(source, v, key, "unknown key (known: endpoint, max_sequences, kv_cache, kv_allocation, prefill_chunk, prefix_cache, max_queue, "
                                         "max_tokens, max_message_bytes, send_hwm, recv_hwm, drain_timeout_s, http, "
                                         "http_max_connections, http_request_timeout_s, default_max_tokens, log_interval_s, curve_secret_key, "
                                         "curve_authorized_keys, api_key_file)");
                }
            }
        } else {
            fail(source, section, sname, "unknown table (known: [plugins], [runtime], [quantize], [[tier]], [placement], [server])");
        }
    }
    if (!rc.server.curve_authorized_keys.empty() && rc.server.curve_secret_key.empty())
        fail(source, *root["server"]["curve_authorized_keys"].node(), "server.curve_authorized_keys",
             "needs server.curve_secret_key (the server's own certificate, from `moesh keygen`): without CURVE no client has a key to check");
    // Pins name tiers that exist (tiers may come after [placement] in the file).
    if (auto * pl = root["placement"].as_table())
        if (auto * pins = (*pl)["pin"].as_array())
            for (size_t i = 0; i < rc.placement.pins.size() && i < pins->size(); ++i) {
                bool found = false;
                for (const TierConfig & t : rc.placement.tiers) found = found || t.name == rc.placement.pins[i].tier;
                if (!found)
                    fail(source, (*pins)[i], "placement.pin.tier",
                         "no [[tier]] named '" + rc.placement.pins[i].tier + "'");
            }
    return rc;
}

RunConfig load_run_config(const std::string & path) {
    RunConfig rc = parse_run_config(read_text_file(path, "the config file"), path);
    const std::filesystem::path base = std::filesystem::path(path).parent_path();
    for (auto & d : rc.plugin_dirs)
        if (std::filesystem::path(d).is_relative()) d = (base / d).lexically_normal().string();
    for (std::string * p : {&rc.server.curve_secret_key, &rc.server.curve_authorized_keys, &rc.server.api_key_file})
        if (!p->empty() && std::filesystem::path(*p).is_relative()) *p = (base / *p).lexically_normal().string();
    return rc;
}

namespace {

} // namespace

} // namespace moesh
