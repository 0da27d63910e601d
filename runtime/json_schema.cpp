#include "runtime/json_schema.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <set>
#include <vector>

namespace moesh {

namespace {

using json = nlohmann::ordered_json;   // properties keep the schema's order

constexpr int k_max_schema_depth = 64;     // nested schemas
constexpr int64_t k_max_enumerated = 1000;  // integer range written out value by value

struct Refused {
    std::string at;
    std::string what;
};

// The primitive rules, emitted only when used.
const std::map<std::string, std::string> & primitives() {
    static const std::map<std::string, std::string> p = {
        {"ws", "[ \\t\\n]{0,32}"},
        // \u escapes: no lone surrogate (nlohmann, and JSON parsers at large, refuse one), pairs whole
        {"char", "[^\"\\\\\\x00-\\x1F] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" ([0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2} | "
                 "[dD] [89abAB] [0-9a-fA-F]{2} \"\\\\u\" [dD] [c-fC-F] [0-9a-fA-F]{2}))"},
        {"string", "\"\\\"\" char* \"\\\"\""},
        {"integer", "\"-\"? (\"0\" | [1-9] [0-9]{0,15})"},
        {"number", "integer (\".\" [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?"},
        {"boolean", "\"true\" | \"false\""},
        {"null", "\"null\""},
        {"value", "object | array | string | number | boolean | null"},
        {"object", "\"{\" ws ( string ws \":\" ws value ( ws \",\" ws string ws \":\" ws value )* ws )? \"}\""},
        {"array", "\"[\" ws ( value ( ws \",\" ws value )* ws )? \"]\""},
        {"uuid", "\"\\\"\" [0-9a-fA-F]{8} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{4} \"-\" [0-9a-fA-F]{12} \"\\\"\""},
        // a real calendar date: 30-day months, February's 28 days and the 29th of leap years
        {"date-part", "[0-9]{4} \"-\" ( ( \"0\" [13578] | \"1\" [02] ) \"-\" ( \"0\" [1-9] | [12] [0-9] | \"3\" [01] ) | "
                      "( \"0\" [469] | \"11\" ) \"-\" ( \"0\" [1-9] | [12] [0-9] | \"30\" ) | \"02-\" ( \"0\" [1-9] | \"1\" [0-9] | \"2\" [0-8] ) ) | "
                      "leap-year \"-02-29\""},
        {"leap-year", "[0-9] [0-9] ( \"0\" [48] | [2468] [048] | [13579] [26] ) | ( \"0\" [048] | [2468] [048] | [13579] [26] ) \"00\""},
        {"time-part", "( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\" [0-5] [0-9] ( \".\" [0-9]{1,9} )? ( \"Z\" | [+-] ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] )"},
        {"date", "\"\\\"\" date-part \"\\\"\""},
        {"time", "\"\\\"\" time-part \"\\\"\""},
        {"date-time", "\"\\\"\" date-part \"T\" time-part \"\\\"\""},
    };
    return p;
}

const std::map<std::string, std::vector<std::string>> & primitive_uses() {
    static const std::map<std::string, std::vector<std::string>> u = {
        {"string", {"char"}},      {"number", {"integer"}},
        {"value", {"object", "array", "string", "number", "boolean", "null"}},
        {"object", {"ws", "string", "value"}}, {"array", {"ws", "value"}},
        {"date", {"date-part"}},   {"time", {"time-part"}}, {"date-time", {"date-part", "time-part"}},
        {"date-part", {"leap-year"}},
    };
    return u;
}

// A GBNF literal for bytes (escaping what the notation needs).
std::string literal(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            snprintf(buf, sizeof buf, "\\x%02X", c);
            out += buf;
        } else {
            out += char(c);
        }
    }
    return out + "\"";
}

std::string rule_name(const std::string & hint) {
    std::string n;
    for (char c : hint) n += (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ? c : '-';
    if (n.empty()) n = "x";
    return n.substr(0, 40);
}

std::string pointer_escape(const std::string & key) {
    std::string out;
    for (char c : key) out += c == '~' ? "~0" : c == '/' ? "~1" : std::string(1, c);
    return out;
}

class Converter {
public:
    explicit Converter(const json & root) : root_(root) {}

    std::string run() {
        const std::string top = visit(root_, "root", "", 0);
        std::string out = "root ::= " + top + "\n";
        for (const auto & name : order_) out += name + " ::= " + bodies_[name] + "\n";
        for (const auto & p : used_) out += p + " ::= " + primitives().at(p) + "\n";
        return out;
    }

private:
    [[noreturn]] static void refuse(const std::string & at, std::string what) { throw Refused{at.empty() ? "/" : at, std::move(what)}; }

    std::string use(const std::string & primitive) {
        if (used_.insert(primitive).second && primitive_uses().count(primitive))
            for (const auto & p : primitive_uses().at(primitive)) use(p);
        return primitive;
    }

    // A new rule (the same body twice is one rule); returns its name.
    std::string add(const std::string & hint, const std::string & body) {
        if (auto it = by_body_.find(body); it != by_body_.end()) return it->second;
        std::string name = rule_name(hint);
        if (primitives().count(name) || bodies_.count(name) || name == "root") {
            int k = 1;
            while (bodies_.count(name + "-" + std::to_string(k))) ++k;
            name += "-" + std::to_string(k);
        }
        bodies_[name] = body;
        by_body_[body] = name;
        order_.push_back(name);
        return name;
    }

    const json & resolve(const std::string & ref, const std::string & at) {
        if (ref == "#") return root_;
        for (const char * prefix : {"#/$defs/", "#/definitions/"}) {
            const std::string p = prefix;
            if (ref.rfind(p, 0) != 0) continue;
            const std::string key = ref.substr(p.size());
            const json * defs = root_.contains(p.substr(2, p.size() - 3)) ? &root_.at(p.substr(2, p.size() - 3)) : nullptr;
            if (!defs || !defs->is_object() || !defs->contains(key)) refuse(at, "$ref '" + ref + "' points at nothing");
            return defs->at(key);
        }
        refuse(at, "$ref '" + ref + "': only \"#\", \"#/$defs/NAME\" and \"#/definitions/NAME\" are supported");
    }

    static void refuse_unsupported(const json & s, const std::string & at) {
        static const char * restricting[] = {"pattern", "patternProperties", "minProperties", "maxProperties", "exclusiveMinimum",
                                             "exclusiveMaximum", "multipleOf", "not", "if", "then", "else",
                                             "dependentRequired", "dependentSchemas", "dependencies", "contains", "minContains",
                                             "maxContains", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                                             "$dynamicRef", "contentSchema"};
        for (const char * k : restricting)
            if (s.contains(k)) refuse(at, std::string("'") + k + "' is not supported (it restricts what is valid, so it is not ignored)");
        if (s.contains("uniqueItems") && s.at("uniqueItems") == true) refuse(at, "'uniqueItems' is not supported");
    }

    // The JSON value v as written compactly, but with whitespace allowed where JSON allows it.
    std::string value_literal(const json & v) {
        if (!v.is_structured()) return literal(v.dump());
        use("ws");
        const bool obj = v.is_object();
        std::string out = obj ? "( \"{\" ws" : "( \"[\" ws";
        bool first = true;
        for (auto it = v.begin(); it != v.end(); ++it) {
            out += first ? " " : " ws \",\" ws ";
            if (obj) out += literal(json(it.key()).dump()) + " ws \":\" ws ";
            out += value_literal(it.value());
            first = false;
        }
        return out + (first ? "" : " ws") + (obj ? " \"}\" )" : " \"]\" )");
    }

    static int64_t count(const json & s, const char * key, const std::string & at, int64_t dflt) {
        if (!s.contains(key)) return dflt;
        const json & v = s.at(key);
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 10000)
            refuse(at, std::string("'") + key + "' must be an integer in [0, 10000]");
        return v.get<int64_t>();
    }

    // An expression matching the instances of schema s (a rule name or a primitive).
    std::string visit(const json & s, const std::string & hint, const std::string & at, int depth) {
        if (depth > k_max_schema_depth) refuse(at, "schemas nested over " + std::to_string(k_max_schema_depth) + " deep");
        if (s.is_boolean()) {
            if (!s.get<bool>()) refuse(at, "the schema false matches nothing");
            return use("value");
        }
        if (!s.is_object()) refuse(at, "a schema must be an object or a boolean");
        refuse_unsupported(s, at);
        if (auto it = s.find("$ref"); it != s.end()) {
            if (!it->is_string()) refuse(at + "/$ref", "must be a string");
            const std::string ref = it->get<std::string>();
            if (auto r = ref_rules_.find(ref); r != ref_rules_.end()) return r->second;
            // Named before it is built, so that a recursive schema refers to itself.
            const std::string name = add(ref == "#" ? "root-ref" : ref.substr(ref.rfind('/') + 1), "\x01" + ref);
            ref_rules_[ref] = name;
            const std::string body = visit(resolve(ref, at + "/$ref"), name, ref.substr(1), depth + 1);
            by_body_.erase("\x01" + ref);
            bodies_[name] = body;
            return name;
        }
        if (auto it = s.find("const"); it != s.end()) return add(hint, value_literal(*it));
        if (auto it = s.find("enum"); it != s.end()) {
            if (!it->is_array() || it->empty()) refuse(at + "/enum", "must be a non-empty array");
            std::string body;
            for (const json & v : *it) body += (body.empty() ? "" : " | ") + value_literal(v);
            return add(hint, body);
        }
        for (const char * k : {"anyOf", "oneOf"})
            if (auto it = s.find(k); it != s.end()) {
                if (!it->is_array() || it->empty()) refuse(at + "/" + k, "must be a non-empty array");
                std::string body;
                for (size_t i = 0; i < it->size(); ++i)
                    body += (i ? " | " : "") + visit(it->at(i), hint + "-" + std::to_string(i), at + "/" + k + "/" + std::to_string(i), depth + 1);
                return add(hint, body);
            }
        if (auto it = s.find("allOf"); it != s.end()) {
            if (!it->is_array() || it->size() != 1) refuse(at + "/allOf", "only an allOf of one schema is supported");
            return visit(it->at(0), hint, at + "/allOf/0", depth + 1);
        }
        std::vector<std::string> types;
        if (auto it = s.find("type"); it != s.end()) {
            if (it->is_string()) types.push_back(it->get<std::string>());
            else if (it->is_array() && !it->empty())
                for (const json & t : *it) {
                    if (!t.is_string()) refuse(at + "/type", "must be a string or an array of strings");
                    types.push_back(t.get<std::string>());
                }
            else refuse(at + "/type", "must be a string or a non-empty array of strings");
        } else if (s.contains("properties") || s.contains("additionalProperties") || s.contains("required")) {
            types.push_back("object");
        } else if (s.contains("items") || s.contains("prefixItems")) {
            types.push_back("array");
        } else {
            return use("value");
        }
        std::string body;
        for (const std::string & t : types) body += (body.empty() ? "" : " | ") + typed(s, t, hint, at, depth);
        return types.size() == 1 ? body : add(hint, body);
    }

    std::string typed(const json & s, const std::string & t, const std::string & hint, const std::string & at, int depth) {
        if (t == "string") return string_rule(s, hint, at);
        if (t == "integer") return integer_rule(s, hint, at);
        if (t == "number") {
            if (s.contains("minimum") || s.contains("maximum")) refuse(at, "'minimum'/'maximum' are only supported for integers");
            return use("number");
        }
        if (t == "boolean") return use("boolean");
        if (t == "null") return use("null");
        if (t == "object") return object_rule(s, hint, at, depth);
        if (t == "array") return array_rule(s, hint, at, depth);
        refuse(at + "/type", "unknown type '" + t + "' (string, integer, number, boolean, null, object, array)");
    }

    std::string string_rule(const json & s, const std::string & hint, const std::string & at) {
        if (auto it = s.find("format"); it != s.end() && it->is_string()) {
            const std::string f = it->get<std::string>();
            if (f == "date" || f == "time" || f == "date-time" || f == "uuid") return use(f);
        }
        const int64_t lo = count(s, "minLength", at, 0), hi = count(s, "maxLength", at, -1);
        if (lo == 0 && hi < 0) return use("string");
        if (hi >= 0 && hi < lo) refuse(at, "maxLength < minLength");
        use("char");
        return add(hint, "\"\\\"\" char{" + std::to_string(lo) + "," + (hi >= 0 ? std::to_string(hi) : "") + "} \"\\\"\"");
    }

    std::string integer_rule(const json & s, const std::string & hint, const std::string & at) {
        const bool has_lo = s.contains("minimum"), has_hi = s.contains("maximum");
        if (!has_lo && !has_hi) return use("integer");
        auto bound = [&](const char * k) {
            const json & v = s.at(k);
            // 2^63 as a double: integers in (-2^63, 2^63) convert exactly and without overflow
            constexpr double k_limit = 9223372036854775808.0;
            if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) refuse(at + "/" + k, "out of the 64-bit range");
            if (v.is_number_float()) {
                const double d = v.get<double>();
                if (!(d > -k_limit && d < k_limit)) refuse(at + "/" + k, "out of the 64-bit range");
                if (d != std::floor(d)) refuse(at + "/" + k, "must be an integer");
                return int64_t(d);
            }
            if (!v.is_number_integer()) refuse(at + "/" + k, "must be an integer");
            return v.get<int64_t>();
        };
        const int64_t lo = has_lo ? bound("minimum") : 0, hi = has_hi ? bound("maximum") : 0;
        if (has_lo && has_hi) {
            if (hi < lo) refuse(at, "maximum < minimum");
            if (uint64_t(hi) - uint64_t(lo) >= uint64_t(k_max_enumerated))   // hi >= lo: exact, no overflow
                refuse(at, "an integer range of more than " + std::to_string(k_max_enumerated) + " values is not supported");
            std::string body;
            for (int64_t v = lo; v <= hi; ++v) body += (body.empty() ? "\"" : " | \"") + std::to_string(v) + "\"";
            return add(hint, body);
        }
        if (has_lo && !has_hi && (lo == 0 || lo == 1))
            return add(hint, lo == 0 ? "\"0\" | [1-9] [0-9]{0,15}" : "[1-9] [0-9]{0,15}");
        refuse(at, "integer bounds are supported as a minimum of 0 or 1, or a range of at most " +
                       std::to_string(k_max_enumerated) + " values");
    }

    std::string object_rule(const json & s, const std::string & hint, const std::string & at, int depth) {
        const json empty = json::object();
        const json & props = s.contains("properties") ? s.at("properties") : empty;
        if (!props.is_object()) refuse(at + "/properties", "must be an object");
        std::set<std::string> required;
        if (auto it = s.find("required"); it != s.end()) {
            if (!it->is_array()) refuse(at + "/required", "must be an array of property names");
            for (const json & r : *it) {
                if (!r.is_string()) refuse(at + "/required", "must be an array of property names");
                if (!props.contains(r.get<std::string>()))
                    refuse(at + "/required", "'" + r.get<std::string>() + "' is required but not among the properties");
                required.insert(r.get<std::string>());
            }
        }
        const json * extra = s.contains("additionalProperties") ? &s.at("additionalProperties") : nullptr;
        if (props.empty() && (!extra || *extra == true)) return use("object");
        std::string extra_pair;   // a property the schema does not name (only when it names none:
                                  // a grammar cannot easily say "any key but these")
        if (props.empty() && extra && !(extra->is_boolean() && !extra->get<bool>())) {
            const std::string v = visit(*extra, hint + "-extra", at + "/additionalProperties", depth + 1);
            extra_pair = use("string") + " ws \":\" ws " + v;
        }
        use("ws");
        std::vector<std::string> pairs;
        std::vector<bool> req;
        for (const auto & [k, v] : props.items()) {
            const std::string value = visit(v, hint + "-" + k, at + "/properties/" + pointer_escape(k), depth + 1);
            pairs.push_back(literal(json(k).dump()) + " ws \":\" ws " + value);
            req.push_back(required.count(k) > 0);
        }
        // tail[i]: properties i.. after one was written (each with its comma); first[i]: the
        // first one written is i or later (never empty).
        const size_t n = pairs.size();
        std::string tail = extra_pair.empty() ? "" : add(hint + "-more", "( ws \",\" ws " + extra_pair + " )*");
        std::vector<std::string> tails(n + 1);
        tails[n] = tail;
        for (size_t i = n; i-- > 0;) {
            std::string item = "ws \",\" ws " + pairs[i];
            std::string body = req[i] ? item + (tails[i + 1].empty() ? "" : " " + tails[i + 1])
                                      : "( " + item + " )?" + (tails[i + 1].empty() ? "" : " " + tails[i + 1]);
            tails[i] = add(hint + "-after-" + std::to_string(i), body);
        }
        std::string first = extra_pair.empty() ? "" : extra_pair + (tail.empty() ? "" : " " + tail);
        bool nullable = true;   // every property optional
        for (size_t i = n; i-- > 0;) {
            std::string own = pairs[i] + (tails[i + 1].empty() ? "" : " " + tails[i + 1]);
            first = req[i] || first.empty() ? own : own + " | " + first;
            nullable = nullable && !req[i];
            first = add(hint + "-from-" + std::to_string(i), first);
        }
        if (first.empty()) return add(hint, "\"{\" ws \"}\"");
        return add(hint, nullable ? "\"{\" ws ( " + first + " ws )? \"}\"" : "\"{\" ws " + first + " ws \"}\"");
    }

    std::string array_rule(const json & s, const std::string & hint, const std::string & at, int depth) {
        use("ws");
        if (auto it = s.find("prefixItems"); it != s.end()) {
            if (!it->is_array() || it->empty()) refuse(at + "/prefixItems", "must be a non-empty array");
            if (s.contains("items") && s.at("items") != false)
                refuse(at + "/items", "items after prefixItems are not supported (set \"items\": false)");
            std::string body = "\"[\" ws";
            for (size_t i = 0; i < it->size(); ++i)
                body += (i ? " ws \",\" ws " : " ") + visit(it->at(i), hint + "-" + std::to_string(i), at + "/prefixItems/" + std::to_string(i), depth + 1);
            return add(hint, body + " ws \"]\"");
        }
        const std::string item = s.contains("items") ? visit(s.at("items"), hint + "-item", at + "/items", depth + 1) : use("value");
        const int64_t lo = count(s, "minItems", at, 0), hi = count(s, "maxItems", at, -1);
        if (hi >= 0 && hi < lo) refuse(at, "maxItems < minItems");
        if (hi == 0) return add(hint, "\"[\" ws \"]\"");
        const std::string more = "( ws \",\" ws " + item + " ){" + std::to_string(lo > 0 ? lo - 1 : 0) + "," +
                                 (hi >= 0 ? std::to_string(hi - 1) : "") + "}";
        const std::string items = item + " " + more + " ws";
        return add(hint, lo > 0 ? "\"[\" ws " + items + " \"]\"" : "\"[\" ws ( " + items + " )? \"]\"");
    }

    const json & root_;
    std::map<std::string, std::string> bodies_, by_body_, ref_rules_;
    std::vector<std::string> order_;
    std::set<std::string> used_;
};

} // namespace

std::string json_schema_to_grammar(std::string_view schema_json, std::string * error) {
    try {
        const json schema = json::parse(schema_json);
        return Converter(schema).run();
    } catch (const Refused & r) {
        *error = "json_schema at " + r.at + ": " + r.what;
        return "";
    } catch (const json::parse_error & e) {
        *error = std::string("json_schema: invalid JSON: ") + e.what();
        return "";
    } catch (const json::exception & e) {
        *error = std::string("json_schema: ") + e.what();
        return "";
    }
}

std::string json_object_grammar() {
    std::string err;
    return json_schema_to_grammar(R"({"type": "object"})", &err);
}

} // namespace moesh
