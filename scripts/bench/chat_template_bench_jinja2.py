#!/usr/bin/env python3
"""jinja2 under transformers' environment on the cases of moesh_bench_chat_template (same
templates, conversations and tools), one JSON line per case.

    pip install transformers==5.24.0 jinja2==3.1.6
    python3 scripts/bench/chat_template_bench_jinja2.py [--reps N]
"""
import argparse
import json
import pathlib
import time

import jinja2
from transformers.utils.chat_template_utils import _compile_jinja_template

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    doc = json.loads((ROOT / "tests" / "fixtures" / "chat_templates" / "jinja.json").read_text())
    for name in ["Qwen-Qwen3-0.6B", "openai-gpt-oss-120b", "meta-llama-Llama-3.1-8B-Instruct", "deepseek-ai-DeepSeek-V3.1"]:
        t = next(x for x in doc["templates"] if x["name"] == name)
        compiled = _compile_jinja_template(t["template"])
        tools = t["cases"][5]["vars"]["tools"]
        for n in (2, 50):
            msgs = [{"role": "assistant" if m % 2 else "user", "content": chr(ord("a") + m % 26) * 200} for m in range(n)]
            render = lambda: compiled.render(messages=msgs, tools=tools, documents=None, add_generation_prompt=True,
                                             bos_token="<s>", eos_token="</s>")
            size = len(render().encode())
            t0 = time.perf_counter()
            for _ in range(args.reps):
                render()
            us = (time.perf_counter() - t0) / args.reps * 1e6
            print(json.dumps({"bench": "chat_template", "engine": f"jinja2 {jinja2.__version__}", "template": name,
                              "messages": n, "tools": 1, "render_us": round(us, 1), "prompt_bytes": size}))


if __name__ == "__main__":
    main()
