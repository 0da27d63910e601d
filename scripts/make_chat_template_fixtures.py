#!/usr/bin/env python3
"""Renders the chat templates of real instruction-tuned models with
transformers' own Jinja renderer (render_jinja_template, what
apply_chat_template runs) and records the strings, as references for
tests/runtime/chat_template_test.cpp.

    pip install transformers==5.24.0 jinja2==3.1.6
    python3 scripts/make_chat_template_fixtures.py [out_file]

Writes tests/fixtures/chat_templates/cases.json:
  {"versions": {...}, "templates": [{"name", "family", "source", "template",
   "bos_token", "eos_token", "cases": [{"messages", "add_generation_prompt",
   "rendered" | "error"}]}]}
"error" is the message of the exception the template raises (e.g. roles
that do not alternate). The templates are copied verbatim from each model's
tokenizer_config.json (named in "source"). Deterministic.
"""
import json
import os
import platform
import sys

import jinja2
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

CHATML_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

TEMPLATES = [
    ("smollm2", "chatml", "HuggingFaceTB/SmolLM2-135M-Instruct", CHATML_SMOLLM2, "<|im_start|>", "<|im_end|>"),
    ("qwen2", "chatml", "Qwen/Qwen2-0.5B-Instruct", CHATML_QWEN2, None, "<|im_end|>"),
    ("llama3", "llama3", "meta-llama/Meta-Llama-3-8B-Instruct", LLAMA3_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>"),
    ("mistral_v01", "mistral-v1", "mistralai/Mixtral-8x7B-Instruct-v0.1", MISTRAL_V01, "<s>", "</s>"),
    ("mistral_v03", "mistral-v3", "mistralai/Mistral-7B-Instruct-v0.3", MISTRAL_V03, "<s>", "</s>"),
]

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}
CONVERSATIONS = [
    [U("Hello!")],
    [S("You are terse."), U("What is 2+2?")],
    [S("Answer in French."), U("Hi"), A("Bonjour !"), U("How are you?")],
    [U("First question"), A("First answer"), U("Second question"), A("  Second answer, padded  \n")],
    [U("  padded user text \n"), A("ok"), U("Unicode: caf\u00e9 \u65e5\u672c \U0001F600\nnew line")],
    [S("System only at the start"), U("x"), A("y")],
    [U("Two"), U("users in a row")],
    [U("a"), S("late system message")],
]


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "chat_templates", "cases.json")
    templates = []
    for name, family, source, template, bos, eos in TEMPLATES:
        cases = []
        for messages in CONVERSATIONS:
            for gen in (False, True):
                case = {"messages": messages, "add_generation_prompt": gen}
                try:
                    rendered = render_jinja_template(conversations=[messages], chat_template=template,
                                                     add_generation_prompt=gen, bos_token=bos, eos_token=eos)
                    case["rendered"] = rendered[0][0] if isinstance(rendered, tuple) else rendered[0]
                except Exception as e:  # the template's raise_exception
                    case["error"] = str(e)
                cases.append(case)
        templates.append({"name": name, "family": family, "source": source, "template": template,
                          "bos_token": bos, "eos_token": eos, "cases": cases})
    doc = {"versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__,
                        "python": platform.python_version()}, "templates": templates}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
