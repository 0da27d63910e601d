#!/usr/bin/env python3
"""References for runtime/jinja.cpp: renders Jinja snippets and real chat
templates with jinja2 under transformers' own environment
(render_jinja_template: ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, its tojson, raise_exception, strftime_now,
namespace, dict) and records what comes out.

    pip install transformers==5.24.0 jinja2==3.1.6
    python3 scripts/make_jinja_fixtures.py TEMPLATES_DIR [out_file] [--all]

TEMPLATES_DIR is llama.cpp's models/templates folder (in the
llama-cpp-python 0.3.36 sdist: vendor/llama.cpp/models/templates), which
holds the chat templates of real models as their tokenizer_config.json has
them. Writes tests/fixtures/chat_templates/jinja.json:
  {"versions", "now", "snippets": [{"template", "vars", "rendered" | "error"}],
   "templates": [{"name", "template", "cases": [{"input", "vars", "rendered" | "error"}]}]}
"input" is what apply_chat_template was given; "vars" what the template saw.
"error" is the exception's class and message. Only the templates in
TEMPLATES below go into the file; --all renders every template of the
folder and prints a summary (for measuring coverage, nothing is written).
strftime_now sees a fixed time, NOW. Deterministic.
"""
import datetime
import json
import os
import platform
import sys

import jinja2
import transformers
import transformers.utils.chat_template_utils as ctu

NOW = datetime.datetime(2026, 3, 7, 14, 5, 9)


class _FixedClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return NOW


ctu.datetime = _FixedClock   # what strftime_now calls

# Chat templates of models moesh serves (MoE families first) and of widely used ones.
TEMPLATES = [
    "Qwen-Qwen3-0.6B",                 # Qwen3 and Qwen3-MoE
    "Qwen3-Coder",
    "Qwen-Qwen2.5-7B-Instruct",
    "deepseek-ai-DeepSeek-V3.1",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "openai-gpt-oss-120b",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "google-gemma-2-2b-it",
    "HuggingFaceTB-SmolLM3-3B",
    "moonshotai-Kimi-K2",
    "GLM-4.6",
    "MiniMax-M2",
    "ibm-granite-granite-3.3-2B-Instruct",
    "microsoft-Phi-3.5-mini-instruct",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
    "LFM2-8B-A1B",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
]

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
CALL = {"id": "call0AbC9", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_TURN = [U("Weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call0AbC9", "name": "get_weather", "content": "{\"temp\": 21}"}]


def conversations():
    base = {"bos_token": "<s>", "eos_token": "</s>"}
    out = []
    for msgs, gen in [([U("Hello!")], True),
                      ([S("You are terse."), U("What is 2+2?")], True),
                      ([S("Answer in French."), U("Hi"), A("Bonjour !"), U("Ça va ?  \n")], True),
                      ([U("First"), A("  Second answer, padded  \n")], False),
                      ([U("Unicode: caf\u00e9 \u65e5\u672c \U0001F600")], True)]:
        out.append(dict(base, messages=msgs, add_generation_prompt=gen))
    out.append(dict(base, messages=[U("Weather in Paris?")], tools=TOOLS, add_generation_prompt=True))
    out.append(dict(base, messages=TOOL_TURN, tools=TOOLS, add_generation_prompt=True))
    out.append(dict(base, messages=[U("Think."), {"role": "assistant", "content": "42",
                                                  "reasoning_content": "Six times seven."}, U("Again?")],
                    add_generation_prompt=True))
    out.append(dict(base, messages=[U("Quick")], add_generation_prompt=True, enable_thinking=False))
    return out


# Snippets: one construct each, including the errors a template can raise.
SNIPPETS = [
    ("{% for x in [1,2,3] %}{% if loop.first %}{% set y = 5 %}{% endif %}[{{ y }}]{% endfor %}", {}),
    ("a\n  {# c #}\nb\n  {% if 1 %}\nc\n  {% endif %}\nd\n", {}),
    ("x  {% if 1 %}y{% endif %} {%- if 1 %} z {% endif -%} w {%+ if 1 %}v{% endif +%}\nu", {}),
    ("{{ [1,'a',{'b':None,'c':True}] }} {{ 1.0 }} {{ 1e16 }} {{ 1e15 }} {{ 0.1 }} {{ 1e-5 }} {{ 2.5e-300 }} {{ -0.0 }}", {}),
    ("{{ undefined_x.foo }}", {}),
    ("{{ {'a':1}|tojson }} {{ 'é\"\n\u2028\x01'|tojson }} {{ [1,2]|tojson(indent=2) }}", {}),
    ("{{ x|tojson(indent=2) }}|{{ x|tojson(separators=(',',':')) }}|{{ x|tojson(sort_keys=true) }}|{{ 'é😀'|tojson(ensure_ascii=true) }}",
     {"x": {"b": {}, "a": [], "c": {"d": [1, 2.5, None, True]}}}),
    ("{{ (1,2) }} {{ (1,) }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7 / 2 }} {{ 4 / 2 }} {{ 2 ** 10 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{{ x.y }}|{{ x['y'] }}|{{ l.y }}|{{ l[5] }}|{{ l[-1] }}", {"x": {}, "l": [1, 2]}),
    ("{{ x.y.z }}", {"x": {}}),
    ("{{ [1,2].append(3) }}", {}),
    ("{% set ns = namespace(a=1, b='x') %}{% for i in range(3) %}{% set ns.a = ns.a + i %}{% endfor %}{{ ns.a }} {{ ns.b }}", {}),
    ("{% macro m(a, b='x') %}<{{ a }}{{ b }}{{ c }}>{% endmacro %}{% set c = 'C' %}{{ m(1) }}{{ m(2, b=3) }}{{ m(a=4) }}", {}),
    ("{{ 'abc'[::-1] }} {{ 'héllo'|length }} {{ 'héllo'[1:3] }} {{ 'héllo'[-2:] }} {{ [1,2,3,4,5][1::2] }} {{ [1,2,3][:-1] }} {{ none }} {{ True }}", {}),
    ("{{ -1|abs }} {{ 'a' ~ 1 ~ none ~ 2.0 }} {{ not 0 }} {{ 1 if 0 }}|{{ 'y' if 1 else 'n' }} {{ 0 or 'z' }} {{ 1 and 2 }}", {}),
    ("{{ 'a' in 'cat' }} {{ 3 in [1,2] }} {{ 'k' in {'k':1} }} {{ 'x' not in 'abc' }} {{ 1 < 2 < 3 }} {{ 1 < 3 < 2 }} {{ [1,2] == [1,2] }} {{ 1 == 1.0 }} {{ true == 1 }}", {}),
    ("{{ 'a' in none }}", {}),
    ("{{ 1 < 'a' }}", {}),
    ("{{ undefined_name + 'a' }}", {}),
    ("{{ undefined_name ~ 'a' }}{{ undefined_name|length }}{{ undefined_name|trim }}{{ undefined_name|default('d') }}{{ ''|default('e', true) }}{{ none|default('f') }}", {}),
    ("{% for a in [1,2,3] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem }}|{{ loop.nextitem }}|{{ loop.cycle('o','e') }};{% endfor %}", {}),
    ("{% for x in [1,2,3,4] if x is even %}{{ loop.index }}:{{ x }}{% else %}none{% endfor %}|{% for x in [] %}{% else %}empty{% endfor %}", {}),
    ("{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}{{ d|items|list }}{{ d.keys()|list }}{{ d.values()|list }}{{ d.get('a') }}{{ d.get('z') }}{{ d.get('z', 0) }}", {"d": {"b": 1, "a": 2}}),
    ("{{ {'a':[1,(2,3)],'b':'x\\'y'}|string }} {{ 'it\\'s' }} {{ ['it\\'s', \"q\\\"\", 'n\\nl', 'both\\'\"'] }}", {}),
    ("{{ '  a b  '.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a b c'.split(' ', 1) }} {{ 'a b c'.rsplit(' ', 1) }} {{ '  x  y '.split(none, 1) }} {{ 'a\\nb'.splitlines() }}", {}),
    ("{{ ' x '.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ ' x '.lstrip() }}|{{ ' x '.rstrip() }}|{{ 'Hi'.upper() }}{{ 'Hi'.lower() }}|{{ 'ab'.startswith('a') }}{{ 'ab'.endswith(('x','b')) }}|{{ 'aaa'.replace('a','b',2) }}|{{ 'abcb'.find('b') }}{{ 'abcb'.rfind('b') }}{{ 'abcb'.count('b') }}|{{ '-'.join(['a','b']) }}|{{ '12'.isdigit() }}{{ 'hello world'.title() }}{{ 'hELLO'.capitalize() }}", {}),
    ("{{ 3|string + 'a' }} {{ 1.5|int }} {{ '12'|int + 1 }} {{ 'x'|int }} {{ '2.5'|float }} {{ 7|float }} {{ '3'|int(5) }} {{ 2.567|round(2) }} {{ 2.5|round }} {{ 2.1|round(0, 'ceil') }}", {}),
    ("{{ [3,1,2]|sort }} {{ ['b','A','a']|sort }} {{ [3,1,2]|sort(reverse=true) }} {{ ['b','A','a']|max }} {{ [4,2,8]|min }} {{ [1,2]|sum }} {{ [1,1,2]|unique|list }} {{ x|sort(attribute='n')|map(attribute='n')|list }}", {"x": [{"n": 2}, {"n": 1}]}),
    ("{{ 'hello world'|title }} {{ 'hELLO'|capitalize }} {{ 'abc'|upper }} {{ 'a<b>&\"\\''|e }} {{ 'aXbX'|replace('X', '-') }} {{ [1,2]|reverse|list }} {{ 'abc'|reverse }} {{ 'a b  c'|wordcount }}", {}),
    ("{{ 'a\nb\n\nc'|indent(2) }}|{{ 'a\nb'|indent(2, true) }}|{{ 'a\n\nb'|indent(3, blank=true) }}|{{ 'x'|indent('>> ', first=true) }}", {}),
    ("{{ x|selectattr('role','equalto','user')|map(attribute='content')|join(',') }}|{{ x|rejectattr('role','eq','user')|list|length }}|{{ x|selectattr('tool')|list|length }}|{{ [1,0,2]|select|list }}|{{ [1,2,3]|reject('odd')|list }}|{{ [1,2,3]|select('gt', 1)|list }}|{{ ['a','b']|map('upper')|join }}",
     {"x": [{"role": "user", "content": "a"}, {"role": "x", "content": "b", "tool": 1}, {"role": "user", "content": "c"}]}),
    ("{{ none|tojson }} {{ 1e100|tojson }} {{ 3.0|tojson }} {{ (1,2)|tojson }} {{ ''|first }}|{{ []|last }}|{{ [1,2]|first }}{{ 'xyz'|last }}{{ x|first }}", {"x": {"k": 1}}),
    ("{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ none is none }}{{ 1 is number }}{{ 1.5 is float }}{{ 1 is integer }}{{ true is boolean }}{{ 'a' is string }}{{ {} is mapping }}{{ [] is iterable }}{{ 'a' is sequence }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 1 is not none }}{{ 'ab' is lower }}{{ range is callable }}{{ 1 is in [1] }}{{ x is sameas x }}{{ true is true }}{{ 0 is false }}",
     {"x": [1]}),
    ("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t = 1, %}{{ t }}{% set s %}  block {{ a }}  {% endset %}[{{ s }}]{% set f | trim | upper %}  x  {% endset %}[{{ f }}]", {}),
    ("{% filter upper %}abc{{ 'd' }}{% endfilter %}{% raw %}{{ not rendered }}{% endraw %}{% generation %}gen{% endgeneration %}", {}),
    ("{{ raise_exception('Bad role: ' ~ role) }}", {"role": "x"}),
    ("{{ strftime_now('%Y-%m-%d %H:%M:%S %d %b %Y %A') }}", {}),
    ("{{ dict(a=1, b=[2]) }} {{ dict({'x': 1}, y=2) }} {{ namespace({'p': 1}).p }}", {}),
    ("{% macro r(n) %}{% if n > 0 %}{{ n }}{{ r(n - 1) }}{% endif %}{% endmacro %}{{ r(5) }}", {}),
    ("{% for m in messages %}{{ m.role }}{{ m['content'] }}{{ m.missing }}{% if m.missing is not defined %}!{% endif %}{% endfor %}",
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}),
    ("{{ x * 2 }}{{ 'ab' * 3 }}{{ [0] * 2 }}{{ x - 1.5 }}{{ 10 / 4 }}{{ 2 ** -1 }}{{ x + true }}", {"x": 3}),
    ("{% if x %}a{% elif y %}b{% else %}c{% endif %}{% if not x and not y %}d{% endif %}", {"y": 1}),
    ("{{ 'x' ~ (1, 2) }} {{ [1, [2, 'a']]|string }} {{ {'k': {'n': none}} }} {{ 1.5e300 * 1e10 }} {{ '%d'|length }}", {}),
    ("{{ x['a'] }}{{ x.b['c'] }}{{ x.b.c.0 }}{{ x['b']['c'][1] }}", {"x": {"a": 1, "b": {"c": [5, 6]}}}),
    ("{{ 'unterminated }}", {}),
    ("{% if x %}never closed", {}),
    ("{% endif %}", {}),
    ("{{ x | nosuchfilter }}", {}),
    ("{% include 'other.jinja' %}", {}),
    ("{{ 1 / 0 }}", {}),
    ("{{ {'a': 1}.a }} {{ {'items': 5}['items'] }} {{ {'get': 1}.get('get') }} {{ {'keys': 1}.keys()|list }}", {}),
    ("{{ messages[0].content[0].text }}{{ messages[0]['content'][1]['type'] }}{% for c in messages[0].content %}{{ c.type }}{% endfor %}",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "T"}, {"type": "image"}]}]}),
]


def render(template, variables):
    try:
        return {"rendered": ctu._compile_jinja_template(template).render(**variables)}
    except Exception as e:   # noqa: BLE001 - the error is the reference
        return {"error": type(e).__name__ + ": " + str(e)}


def template_vars(case):
    # What render_jinja_template passes: tools and documents always (None when not given),
    # reasoning aliased to `thinking` and `reasoning_content`.
    v = dict(case)
    v.setdefault("tools", None)
    v.setdefault("documents", None)
    v["messages"] = ctu._alias_reasoning_fields(v["messages"])
    return v


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        sys.exit(__doc__)
    folder = args[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = args[1] if len(args) > 1 else os.path.join(root, "tests", "fixtures", "chat_templates", "jinja.json")
    if "--all" in sys.argv:
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".jinja"):
                continue
            text = open(os.path.join(folder, name), encoding="utf-8").read()
            results = [render(text, template_vars(c)) for c in conversations()]
            print(name, sum("rendered" in r for r in results), "/", len(results))
        return
    snippets = [dict(template=t, vars=v, **render(t, v)) for t, v in SNIPPETS]
    templates = []
    for name in TEMPLATES:
        text = open(os.path.join(folder, name + ".jinja"), encoding="utf-8").read()
        cases = []
        for c in conversations():
            v = template_vars(c)
            cases.append(dict(input=c, vars=v, **render(text, v)))
        templates.append({"name": name, "template": text, "cases": cases})
    doc = {"versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__,
                        "python": platform.python_version(), "templates_from": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/templates"},
           "now": NOW.isoformat(), "snippets": snippets, "templates": templates}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(out, len(snippets), "snippets,", sum(len(t["cases"]) for t in templates), "template cases")


if __name__ == "__main__":
    main()
