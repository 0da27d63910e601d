// A JSON Schema as a grammar (runtime/grammar.h) whose every match is a JSON text the schema
// accepts, for structured output (OpenAI's response_format json_schema / json_object).
//
//   std::string err;
//   std::string gbnf = json_schema_to_grammar(R"({"type": "object", ...})", &err);
//   if (gbnf.empty()) ... err: "json_schema at /properties/age: ..."
//
// Supported: type (one or a list), properties + required (in the schema's order; optional ones
// may be left out), additionalProperties (with properties given, no others are generated,
// whatever it says; without, true or a schema: any keys), items, prefixItems, minItems, maxItems, enum,
// const, anyOf, oneOf (as anyOf), allOf of one schema, $ref to "#", "#/$defs/..." and
// "#/definitions/...", string minLength/maxLength and format date, time, date-time, uuid,
// integer minimum/maximum (a lower bound of 0 or 1, or a range of at most 1000 values), and the
// annotations (title, description, default, examples, ...). Keywords that restrict what is
// valid and are not supported (pattern, not, multipleOf, number bounds, ...) are refused by name,
// never silently ignored; an unknown format is an annotation, as JSON Schema 2020-12 has it.
// Whitespace between tokens: up to 32 of space, tab, newline. Numbers: at most 16 integer and
// 16 fraction digits and a 2-digit exponent (so every number fits a double).
//
// Every text the grammar matches is valid; not every valid text is matched (the model is steered
// to one way of writing each value): enum/const strings as written compactly (no \u escapes
// for characters that need none), integers without a fraction, a surrogate pair counted as two
// characters by maxLength, oneOf not checked for exclusivity (as anyOf).
#pragma once

#include <string>
#include <string_view>

namespace moesh {

// GBNF text from a schema's JSON text (properties are generated in its order), or "" and
// *error naming the JSON pointer of the part refused.
std::string json_schema_to_grammar(std::string_view schema_json, std::string * error);

// Any JSON object (OpenAI's JSON mode).
std::string json_object_grammar();

} // namespace moesh
