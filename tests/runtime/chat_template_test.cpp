// Chat templates against transformers' renderings of the real templates
// (tests/fixtures/chat_templates/cases.json, scripts/make_chat_template_fixtures.py).
#include "runtime/chat_template.h"
#include "runtime/error.h"
#include "runtime/gguf.h"

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
        auto tmpl = detect_chat_template(t["template"].get<std::string>(), str_or_empty(t["bos_token"]),
                                         str_or_empty(t["eos_token"]));
        ASSERT_TRUE(tmpl.has_value());
        EXPECT_EQ(tmpl->name(), t["family"].get<std::string>());
        for (const auto & c : t["cases"]) {
            std::vector<ChatMessage> messages;
            for (const auto & m : c["messages"]) messages.push_back({m["role"], m["content"]});
            SCOPED_TRACE(c["messages"].dump() + (c["add_generation_prompt"].get<bool>() ? " +gen" : ""));
            if (c.contains("error")) {
                try {
                    tmpl->apply(messages, c["add_generation_prompt"]);
                    ADD_FAILURE() << "no error";
                } catch (const Error & e) {
                    EXPECT_NE(std::string(e.what()).find(c["error"].get<std::string>()), std::string::npos) << e.what();
                }
            } else {
                EXPECT_EQ(tmpl->apply(messages, c["add_generation_prompt"]), c["rendered"].get<std::string>());
            }
        }
    }
}

TEST(ChatTemplate, UnknownTemplatesAreNotRecognised) {
    const char * gemma = "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' "
                         "+ message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}";
    EXPECT_FALSE(detect_chat_template(gemma, "<bos>", "<eos>"));
    EXPECT_FALSE(detect_chat_template("", "<s>", "</s>"));
    const char * llama31 = "{{- bos_token }}<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: "
                           "December 2023<|eot_id|>";
    EXPECT_FALSE(detect_chat_template(llama31, "<|begin_of_text|>", "<|eot_id|>"));
    const char * llama2 = "{{ bos_token + '[INST] ' + '<<SYS>>\\n' + system_message + ' [/INST]' }}";
    EXPECT_FALSE(detect_chat_template(llama2, "<s>", "</s>"));
    const char * qwen3 = "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n<|im_end|>";
    EXPECT_FALSE(detect_chat_template(qwen3, "", "<|im_end|>"));
}

TEST(ChatTemplate, TakesBosAndEosFromTheTokenizer) {
    const json doc = fixtures();
    const std::string mistral = doc["templates"][3]["template"];
    GgufFile f(std::string(MOESH_SOURCE_DIR) + "/tests/fixtures/tokenizers/spm/tokenizer.gguf");
    Tokenizer tok = load_tokenizer_gguf(f, "spm");
    auto t = detect_chat_template(mistral, tok);
    ASSERT_TRUE(t);
    const std::string prompt = t->apply({{"user", "Hi"}, {"assistant", "Hello"}, {"user", "More"}}, true);
    EXPECT_EQ(prompt, "<s>[INST] Hi [/INST]Hello</s>[INST] More [/INST]");
    // the prompt carries its BOS, so it is encoded without adding another
    std::vector<int32_t> ids = tok.encode(prompt, false);
    EXPECT_EQ(ids.front(), tok.bos_id());
    EXPECT_EQ(std::count(ids.begin(), ids.end(), tok.eos_id()), 1);
    EXPECT_FALSE(detect_chat_template(mistral, Tokenizer()));   // no BOS/EOS to put in
}

} // namespace
} // namespace moesh
