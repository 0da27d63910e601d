// The Jinja interpreter against jinja2 under transformers' environment
// (tests/fixtures/chat_templates/jinja.json, scripts/make_jinja_fixtures.py):
// snippets of each construct and the chat templates of real models.
#include "runtime/jinja.h"
#include "jinja_fixture.h"

#include <gtest/gtest.h>

#include <cstring>

namespace moesh::jinja {
namespace {

using ojson = nlohmann::ordered_json;

// Renders one case; compares with jinja2's text, or for its errors checks
// that we fail too and, where our message mimics Python's, that it matches.
void check(const std::string & source, const ojson & vars, const ojson & expected) {
    std::string got;
    try {
        Template t(source);
        got = t.render(vars, test::fixture_clock());
    } catch (const RaisedError & e) {
        ASSERT_TRUE(expected.contains("error")) << "raised " << e.what();
        EXPECT_EQ("TemplateError: " + std::string(e.what()), expected["error"].get<std::string>());
        return;
    } catch (const Error & e) {
        ASSERT_TRUE(expected.contains("error")) << "failed: " << e.what();
        const std::string want = expected["error"].get<std::string>();
        for (const char * kind : {"UndefinedError: ", "TypeError: ", "SecurityError: ", "ZeroDivisionError: "}) {
            if (want.rfind(kind, 0) != 0 || std::string(e.what()).find("not supported in chat templates") != std::string::npos) continue;
            std::string msg = want.substr(std::strlen(kind));
            if (!msg.empty() && msg.back() == '.') msg.pop_back();
            EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what() << "\nwanted " << want;
        }
        EXPECT_EQ(want.rfind("TemplateError: ", 0), std::string::npos) << "expected the template's own error, got " << e.what();
        return;
    }
    ASSERT_TRUE(expected.contains("rendered")) << "rendered " << got << "\nbut jinja2 failed: " << expected["error"];
    EXPECT_EQ(got, expected["rendered"].get<std::string>());
}

TEST(Jinja, SnippetsRenderAsJinja2Does) {
    const ojson & doc = test::jinja_fixture();
    ASSERT_GE(doc["snippets"].size(), 50u);
    for (const auto & s : doc["snippets"]) {
        SCOPED_TRACE(s["template"].get<std::string>());
        check(s["template"], s["vars"], s);
    }
}

TEST(Jinja, RealChatTemplatesRenderAsTransformersDoes) {
    const ojson & doc = test::jinja_fixture();
    ASSERT_GE(doc["templates"].size(), 20u);
    size_t rendered = 0;
    for (const auto & t : doc["templates"]) {
        SCOPED_TRACE(t["name"].get<std::string>());
        for (const auto & c : t["cases"]) {
            SCOPED_TRACE(c["vars"].dump().substr(0, 300));
            check(t["template"], c["vars"], c);
            rendered += c.contains("rendered");
        }
    }
    EXPECT_GE(rendered, 175u);
}

TEST(Jinja, SyntaxErrorsNameTheLine) {
    auto message = [](const char * src) -> std::string {
        try {
            Template t(src);
            return "parsed";
        } catch (const Error & e) {
            return e.what();
        }
    };
    EXPECT_EQ(message("a\nb {% if x %}\nc"), "template line 2: 'if' opened here is never closed with {% elif %} (or another of its clauses)");
    EXPECT_EQ(message("{{ x |\n nosuch }}"), "template line 2: no filter named 'nosuch'");
    EXPECT_EQ(message("\n\n{% include 'x' %}"), "template line 3: the 'include' tag is not supported in chat templates by moesh");
    EXPECT_EQ(message("{{ 'abc }}"), "template line 1: a string is never closed");
    EXPECT_EQ(message("{% for x in y %}{% endif %}"), "template line 1: 'endif' without an open block it could close");
    EXPECT_EQ(message("{% break %}"), "template line 1: 'break' outside a loop");
    EXPECT_EQ(message("{{ (1 }}"), "template line 1: unexpected '}'");
    EXPECT_EQ(message("{{ a b }}"), "template line 1: expected '}}', got 'b'");
}

TEST(Jinja, RenderingIsBoundedForHostileTemplates) {
    RenderOptions o;
    o.limits.max_steps = 100000;
    auto fails_with = [&](const char * src, const char * what) {
        try {
            Template(src).render(ojson::object(), o);
            ADD_FAILURE() << "rendered " << src;
        } catch (const Error & e) {
            EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
        }
    };
    fails_with("{% for i in range(10000000) %}{% endfor %}", "range() longer than");
    fails_with("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", "steps");
    fails_with("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nested deeper than");
    fails_with("{{ 'x' * 100000000 }}", "too long");
    o.limits.max_output = 1000;
    fails_with("{% for i in range(2000) %}ab{% endfor %}", "produced more than 1000 bytes");
    fails_with("{{ 2 ** 64 }}", "integer overflow");
    std::string deep(400, '(');
    EXPECT_THROW(Template("{{ " + deep + "1" + std::string(400, ')') + " }}"), Error);
}

// What a fuzzing helper found (each was a crash, a leak, a hang or unbounded memory).
TEST(Jinja, HostileValuesAreBoundedToo) {
    RenderOptions o;
    o.limits.max_steps = 1000000;
    o.limits.max_alloc = 32u << 20;
    auto outcome = [&](const std::string & src) -> std::string {
        try {
            return "rendered " + Template(src).render(ojson::object(), o);
        } catch (const Error & e) {
            return e.what();
        }
    };
    auto fails_with = [&](const std::string & src, const char * what) {
        const std::string got = outcome(src);
        EXPECT_NE(got.find(what), std::string::npos) << src << "\n" << got;
    };
    fails_with("{% set ns = namespace() %}{% set ns.a = ns %}{{ ns }}", "a namespace cannot hold itself ('a')");
    fails_with("{% set a = namespace() %}{% set b = namespace(x=[a]) %}{% set a.y = {'k': b} %}", "cannot hold itself");
    fails_with("{% set ns = namespace(x=1) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}", "nested deeper than 100");
    fails_with("{% macro m(n) %}{{ " + std::string(150, '-') + "m(n) }}{% endmacro %}{{ m(1) }}", "evaluations nested deeper than");
    fails_with("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "bytes of values");
    fails_with("{{ ('x' * 1000000).replace('', 'y' * 1000000) }}", "replace: the text would be longer");
    fails_with("{{ range(100000)|unique|length }}", "steps");
    // shared sublists: a text or a comparison exponentially larger than the values
    const std::string dag = "{% set ns = namespace(x=[1], y=[1]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}"
                            "{% set ns.y = [ns.y, ns.y] %}{% endfor %}";
    fails_with(dag + "{{ ns.x }}", "text is longer than");
    fails_with(dag + "{{ ns.x == ns.y }}", "steps");
    EXPECT_EQ(outcome(dag + "{{ ns.x == ns.x }}"), "rendered True");   // the same list: no walk
    EXPECT_EQ(outcome("{{ ''*9000000000 }}|{{ []*9000000000 }}|{{ 1 ** 9000000000000 }}|{{ (-1) ** 9000000000001 }}"), "rendered |[]|1|-1");
    EXPECT_EQ(outcome("{{ range(9223372036854775806, 9223372036854775807, 10)|list }}"), "rendered [9223372036854775806]");
    EXPECT_EQ(outcome("{{ 'ab'[1::9223372036854775807] }}"), "rendered b");
    EXPECT_EQ(outcome("{{ [[7]]|map(attribute='99999999999999999999')|list }}"), "rendered [Undefined]");   // as jinja2
    // a chain is as deep as it is long: refused while rendering, freed without recursion
    std::string chain = "{% if false %}{{ x";
    for (int i = 0; i < 60000; ++i) chain += ".a";
    EXPECT_EQ(outcome(chain + " }}{% endif %}ok"), "rendered ok");
    fails_with(chain.substr(std::string("{% if false %}").size()) + " }}", "evaluations nested deeper than");
    fails_with("{% set h = 'a' * 1000000 %}{% for i in range(100000) %}{% if h %}{% endif %}{% endfor %}", "steps");   // copies count
}

// A filter's input is evaluated once: a macro recursing through |trim is linear, not 2^n.
TEST(Jinja, FiltersEvaluateTheirInputOnce) {
    RenderOptions o;
    o.limits.max_steps = 20000;
    const std::string t = "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1)|trim|string }}{% endif %}{% endmacro %}{{ f(20) }}";
    EXPECT_EQ(Template(t).render(ojson::object(), o), "2019181716151413121110987654321");
}

} // namespace
} // namespace moesh::jinja
