#!/usr/bin/env python3
"""Streams one completion from a running `moesh serve`.

    build/bin/moesh serve --endpoint tcp://127.0.0.1:5555 &
    python3 scripts/clients/python/example.py --endpoint tcp://127.0.0.1:5555 --prompt "def add(a, b):"
"""

import argparse
import pathlib
import sys

try:
    from moesh_client import Client, MoeshError
except ImportError:   # not pip-installed: use the package next to this file
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from moesh_client import Client, MoeshError


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole request")
    args = ap.parse_args()

    with Client(args.endpoint) as c:
        try:
            for frame in c.stream(prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                  timeout=args.timeout):
                if frame["type"] == "token":
                    print(frame["text"], end="", flush=True)
                else:
                    t = frame["timings"]   # null when not measured (no token generated)
                    ttft = "-" if t["ttft_ms"] is None else f"{t['ttft_ms']:.1f}"
                    tps = "-" if t["decode_tokens_per_second"] is None else f"{t['decode_tokens_per_second']:.1f}"
                    print(f"\n[{frame['finish_reason']}, {frame['usage']['completion_tokens']} tokens, "
                          f"ttft {ttft} ms, {tps} tokens/s]")
        except MoeshError as e:
            sys.exit(f"example.py: the server refused the request: {e}")
        except TimeoutError:
            sys.exit(f"example.py: no answer from {args.endpoint} within {args.timeout:g} s (is `moesh serve` running?)")


if __name__ == "__main__":
    main()
