// tests/fixtures/chat_templates/jinja.json (scripts/make_jinja_fixtures.py): jinja2's renderings
// of snippets and of real chat templates, read once, for the tests of runtime/jinja.h and of what
// is built on it.
#pragma once

#include "runtime/jinja.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ctime>
#include <fstream>
#include <string>

namespace moesh::test {

inline const nlohmann::ordered_json & jinja_fixture() {
    static const nlohmann::ordered_json doc = [] {
        std::ifstream in(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/chat_templates/jinja.json");
        return nlohmann::ordered_json::parse(in);
    }();
    return doc;
}

// A real template of the fixture by its name (e.g. "Qwen-Qwen3-0.6B").
inline std::string fixture_template(const std::string & name) {
    for (const auto & t : jinja_fixture()["templates"])
        if (t["name"] == name) return t["template"];
    ADD_FAILURE() << "no template " << name << " in the fixture";
    return {};
}

// strftime_now as the fixture saw it: 2026-03-07T14:05:09, a Saturday.
inline jinja::RenderOptions fixture_clock() {
    jinja::RenderOptions o;
    std::tm tm{};
    tm.tm_year = 2026 - 1900;
    tm.tm_mon = 2;
    tm.tm_mday = 7;
    tm.tm_hour = 14;
    tm.tm_min = 5;
    tm.tm_sec = 9;
    tm.tm_wday = 6;
    tm.tm_yday = 65;
    o.now = tm;
    return o;
}

} // namespace moesh::test
