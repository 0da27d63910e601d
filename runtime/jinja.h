// A Jinja2 interpreter for chat templates, rendering as transformers'
// apply_chat_template does: an ImmutableSandboxedEnvironment with
// trim_blocks, lstrip_blocks, loop controls (break/continue) and the
// {% generation %} tag; its tojson (ensure_ascii=False, keys unsorted),
// raise_exception, strftime_now, namespace and dict.
//
//   moesh::jinja::Template t(gguf.get_string("tokenizer.chat_template"));   // throws moesh::Error on bad syntax
//   std::string prompt = t.render({{"messages", msgs}, {"add_generation_prompt", true},
//                                  {"bos_token", "<s>"}, {"eos_token", "</s>"}});
//
// What it covers: statements if/elif/else, for (unpacking, `if` filter,
// else, loop.*), set (names, namespace attributes, blocks), macro, filter
// blocks, raw, break/continue, generation; expressions with Python's
// operators and semantics (str() of lists and dicts, floor division and
// modulo, code-point string indexing and slices); the filters, tests and
// str/list/dict methods chat templates use. Not covered: include, extends,
// import, call blocks, with, `%` string formatting, str.format's format specs;
// a template using them gets an error that names the construct. Differences
// from jinja2 that do not raise: no Markup (`|safe` marks nothing, so
// `Markup + str` does not escape), map/select/reject return lists rather than
// generators (tojson and length work on them), and upper/lower/title/capitalize
// change ASCII letters only.
//
// Templates come from model files, so they are untrusted: parsing bounds
// nesting, rendering bounds steps, output size, macro recursion and range()
// (RenderLimits), and every failure is a moesh::Error naming the line.
//
// Thread safety: a Template is immutable after construction; render is const
// and may run on several threads at once.
#pragma once

#include "runtime/error.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace moesh::jinja {

// raise_exception(message) in the template: what() is the template's message.
class RaisedError : public Error {
public:
    using Error::Error;
};

struct RenderLimits {
    int64_t max_steps = 20'000'000;   // evaluations, and one per element a filter, method or operator walks
    size_t max_output = 16u << 20;    // bytes of text produced, buffers of set blocks and macros included
    size_t max_alloc = 64u << 20;     // bytes of strings and list and dict elements built while rendering
    int max_call_depth = 100;         // nested macro calls
    int max_depth = 400;              // nested evaluations (expressions in statements in macros ...): the stack
    int max_value_depth = 100;        // lists and dicts inside each other
    int64_t max_range = 1'000'000;    // elements of one range()
};

struct RenderOptions {
    RenderLimits limits;
    std::optional<std::tm> now;             // what strftime_now formats; local time now when empty
};

class Template {
public:
    // Parses; throws moesh::Error("template line L: ...") for bad syntax or an
    // unsupported construct.
    explicit Template(std::string_view source);
    ~Template();
    Template(const Template &);
    Template & operator=(const Template &);

    // Renders with the variables of a JSON object (object key order is kept,
    // as Python's dicts keep it). Throws RaisedError for raise_exception,
    // moesh::Error for any other failure (an undefined name, a type error, a
    // limit), naming the line.
    std::string render(const nlohmann::ordered_json & vars, const RenderOptions & options = {}) const;

private:
    struct Impl;
    std::shared_ptr<const Impl> impl_;
};

} // namespace moesh::jinja
