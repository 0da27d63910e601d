// Chat templates against transformers' renderings of the real templates
// (tests/fixtures/chat_templates/cases.json, scripts/make_chat_template_fixtures.py).
#include "runtime/chat_template.h"
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "jinja_fixture.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>

namespace moesh {
namespace {

using json = nlohmann::json;

json fixtures() {
    std::ifstream in(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/chat_templates/cases.json");
    return json::parse(in);
}

std::string str_or_empty(const json & v) { return v.is_string() ? v.get<std::string>() : std::string(); }

TEST(ChatTemplate, RendersExactlyAsTransformersDoes) {
    const json doc = fixtures();
    ASSERT_EQ(doc["templates"].size(), 5u);
    for (const auto & t : doc["templates"]) {
        SCOPED_TRACE(t["name"].get<std::string>());
        ChatTemplate tmpl(t["template"].get<std::string>(), str_or_empty(t["bos_token"]), str_or_empty(t["eos_token"]));
        for (const auto & c : t["cases"]) {
            std::vector<ChatMessage> messages;
            for (const auto & m : c["messages"]) messages.push_back({m["role"], m["content"]});
            SCOPED_TRACE(c["messages"].dump() + (c["add_generation_prompt"].get<bool>() ? " +gen" : ""));
            if (c.contains("error")) {
                try {
                    tmpl.apply(messages, c["add_generation_prompt"]);
                    ADD_FAILURE() << "no error";
                } catch (const Error & e) {
                    EXPECT_EQ(std::string(e.what()), "chat template: " + c["error"].get<std::string>());
                }
            } else {
                EXPECT_EQ(tmpl.apply(messages, c["add_generation_prompt"]), c["rendered"].get<std::string>());
            }
        }
    }
}

// What apply_chat_template adds before the template runs: tools and documents
// (null), reasoning aliased to `thinking`, the caller's extra variables.
TEST(ChatTemplate, PassesWhatTransformersPasses) {
    using ojson = nlohmann::ordered_json;
    const ojson & doc = test::jinja_fixture();
    const jinja::RenderOptions o = test::fixture_clock();
    size_t checked = 0;
    for (const auto & t : doc["templates"]) {
        SCOPED_TRACE(t["name"].get<std::string>());
        const ChatTemplate tmpl(t["template"].get<std::string>(), "<s>", "</s>");
        for (const auto & c : t["cases"]) {
            if (!c.contains("rendered")) continue;
            const ojson & in_vars = c["input"];
            ojson extra = ojson::object();
            for (const auto & [k, v] : in_vars.items())
                if (k != "messages" && k != "add_generation_prompt" && k != "bos_token" && k != "eos_token") extra[k] = v;
            EXPECT_EQ(tmpl.render(in_vars["messages"], in_vars["add_generation_prompt"].get<bool>(), extra, o), c["rendered"].get<std::string>())
                << in_vars.dump().substr(0, 300);
            ++checked;
        }
    }
    EXPECT_GE(checked, 175u);
}

TEST(ChatTemplate, BadTemplatesFailNamingTheLine) {
    try {
        ChatTemplate("{% for m in messages %}\n{{ m.content | nosuch }}{% endfor %}", "<s>", "</s>");
        ADD_FAILURE() << "parsed";
    } catch (const Error & e) {
        EXPECT_EQ(std::string(e.what()), "chat template line 2: no filter named 'nosuch'");
    }
    const ChatTemplate t("{{ messages[0].content.upper() }}{{ messages[1].content }}", "<s>", "</s>");
    EXPECT_EQ(t.apply({{"user", "hi"}, {"assistant", "yo"}}, false), "HIyo");
    EXPECT_THROW(t.apply({{"user", "hi"}}, false), Error);   // an attribute of the undefined messages[1], as jinja2
    EXPECT_EQ(ChatTemplate("[{{ messages[1] }}]", "", "").apply({{"user", "hi"}}, false), "[]");   // printing it is fine
    const ChatTemplate u("\n{{ messages[0].content + 1 }}", "<s>", "</s>");
    try {
        u.apply({{"user", "hi"}}, false);
        ADD_FAILURE() << "rendered";
    } catch (const Error & e) {
        EXPECT_EQ(std::string(e.what()), "chat template line 2: can only concatenate str (not \"int\") to str");
    }
}

TEST(ChatTemplate, TakesBosAndEosFromTheTokenizer) {
    const json doc = fixtures();
    const std::string mistral = doc["templates"][3]["template"];
    GgufFile f(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/tokenizers/spm/tokenizer.gguf");
    Tokenizer tok = load_tokenizer_gguf(f, "spm");
    const ChatTemplate t(mistral, tok);
    const std::string prompt = t.apply({{"user", "Hi"}, {"assistant", "Hello"}, {"user", "More"}}, true);
    EXPECT_EQ(prompt, "<s>[INST] Hi [/INST]Hello</s>[INST] More [/INST]");
    // the prompt carries its BOS, so it is encoded without adding another
    std::vector<int32_t> ids = tok.encode(prompt, false);
    EXPECT_EQ(ids.front(), tok.bos_id());
    EXPECT_EQ(std::count(ids.begin(), ids.end(), tok.eos_id()), 1);
    EXPECT_EQ(chat_stop_ids(tok), std::vector<int32_t>{tok.eos_id()});
}

} // namespace
} // namespace moesh
