#!/usr/bin/env python3
"""References for runtime/tool_calls.cpp: the text each real chat template
shows its model for an assistant's tool calls, as jinja2 renders it under
transformers' environment (the same as scripts/make_jinja_fixtures.py), with
the calls that text stands for. A model writes its calls the way its template
showed them in training, so reading this text back must give these calls.

    pip install transformers==5.24.0 jinja2==3.1.6
    python3 scripts/make_tool_call_fixtures.py TEMPLATES_DIR [out_file]

TEMPLATES_DIR is llama.cpp's models/templates folder (in the llama-cpp-python
0.3.36 sdist: vendor/llama.cpp/models/templates). Writes
tests/fixtures/chat_templates/tool_calls.json:
  {"versions", "tools", "templates": [{"name", "format", "template",
     "cases": [{"text", "content", "calls": [{"name", "arguments"}]}]}]}
"format" is the format moesh must recognise the template by (runtime/tool_calls.h).
"text" is what the model writes after the generation prompt, up to its
end-of-turn token (which ends generation and is not text): the conversation
rendered with the assistant turn, minus the same conversation rendered with the
generation prompt. Where a template renders history differently from a new
turn (DeepSeek-R1's distills), the calls' span is cut out of the rendering.
Cases: one call with nested and Unicode arguments, two calls, and text before
a call, each only where the template writes it (Llama 3.x allows one call and
drops the text; gpt-oss writes one call per message). XML formats write each
argument's value as text (strings as they are, the rest as JSON or Python's
str()), so reading them back needs the tools' schemas ("tools"). Deterministic.
"""
import json
import os
import platform
import sys

import jinja2
import transformers
import transformers.utils.chat_template_utils as ctu

# (template, format moesh reads it as, the calls' opening marker where the
# rendering of history differs from a generation: the span is cut from there)
TEMPLATES = [
    ("Qwen-Qwen2.5-7B-Instruct", "hermes", None),
    ("Qwen-Qwen3-0.6B", "hermes", None),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes", None),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3", None),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3", None),
    ("meta-llama-Llama-3.3-70B-Instruct", "llama3", None),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral", None),
    ("Mistral-Small-3.2-24B-Instruct-2506", "mistral-args", None),
    ("unsloth-mistral-Devstral-Small-2507", "mistral-args", None),
    ("mistralai-Ministral-3-14B-Reasoning-2512", "mistral-args", None),
    ("deepseek-ai-DeepSeek-V3.1", "deepseek-v3.1", None),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "deepseek-r1", "<｜tool▁calls▁begin｜>"),
    ("moonshotai-Kimi-K2", "kimi-k2", None),
    ("openai-gpt-oss-120b", "harmony", None),
    ("Qwen3-Coder", "qwen3-coder", None),
    ("Qwen3.5-4B", "qwen3-coder", None),
    ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "qwen3-coder", "<tool_call>"),
    ("StepFun3.5-Flash", "qwen3-coder", None),
    ("GLM-4.6", "glm", None),
    ("GLM-4.7-Flash", "glm", "<tool_call>"),
    ("MiniMax-M2", "minimax", "<minimax:tool_call>"),
    ("inclusionai-ling-3.0-flash", "glm", None),
    ("deepseek-ai-DeepSeek-V3.2", "deepseek-v3.2", "<\uff5cDSML\uff5cfunction_calls>"),
    ("deepseek-ai-DeepSeek-V4", "deepseek-v4", None),
]

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "alerts": {"type": "boolean"},
            "opts": {"type": "object"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "local_time", "description": "The time now.",
        "parameters": {"type": "object", "properties": {}}}},
]
CALL_A = {"id": "call0AbC9", "type": "function", "function": {
    "name": "get_weather",
    "arguments": {"city": "Paris \"Fr\"", "days": 3, "alerts": False, "opts": {"metric": True, "tags": ["a", "\u00e9\u65e5"], "x": None}}}}
CALL_B = {"id": "call1XyZ8", "type": "function", "function": {"name": "local_time", "arguments": {}}}

# What ends a turn: the model's end token, never part of its text.
ENDS = ["[e~[", "<|role_end|>", "<|im_end|>", "<EOS>", "<|eot_id|>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|call|>", "<|end|>", "<|return|>"]


def render(template, messages, add_generation_prompt):
    return ctu._compile_jinja_template(template).render(
        messages=ctu._alias_reasoning_fields(messages), tools=TOOLS, documents=None,
        add_generation_prompt=add_generation_prompt, bos_token="<BOS>", eos_token="<EOS>")


def model_text(template, content, calls, opener):
    user = [{"role": "user", "content": "Weather in Paris, and the time?"}]
    prompt = render(template, user, True)
    full = render(template, user + [{"role": "assistant", "content": content, "tool_calls": calls}], False)
    if opener is None:
        assert full.startswith(prompt), "the turn does not continue the generation prompt"
        text = full[len(prompt):]
    else:
        text = full[full.index(opener, full.rindex(user[0]["content"])):]   # after the question: not the tools' instructions
    changed = True
    while changed:   # the end token and what the template writes after it
        changed = False
        text2 = text.rstrip("\n")
        for end in ENDS:
            if end in text2:
                cut = text2[:text2.rindex(end)]
                if cut != text:
                    text, changed = cut, True
                break
    return text


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        sys.exit(__doc__)
    folder = args[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = args[1] if len(args) > 1 else os.path.join(root, "tests", "fixtures", "chat_templates", "tool_calls.json")
    templates = []
    for name, fmt, opener in TEMPLATES:
        text = open(os.path.join(folder, name + ".jinja"), encoding="utf-8").read()
        cases = []
        for content, calls in [("", [CALL_A]), ("", [CALL_A, CALL_B]), ("Let me check.", [CALL_A])]:
            try:
                t = model_text(text, content, calls, opener)
            except jinja2.TemplateError:   # e.g. Llama 3.x: one call at a time
                continue
            written = [c for c in calls if c["function"]["name"] in t]
            if len(written) < len(calls) or (content and content not in t):
                continue   # the template does not write this case
            cases.append({"text": t, "content": content,
                          "calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]})
        assert cases, name
        templates.append({"name": name, "format": fmt, "template": text, "cases": cases})
    doc = {"versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__,
                        "python": platform.python_version(),
                        "templates_from": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/templates"},
           "tools": TOOLS, "templates": templates}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(out, len(templates), "templates,", sum(len(t["cases"]) for t in templates), "cases")


if __name__ == "__main__":
    main()
