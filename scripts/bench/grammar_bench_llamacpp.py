#!/usr/bin/env python3
"""llama.cpp's grammar sampler on the same grammar, vocabulary and walk protocol as
moesh_bench_grammar (scripts/bench/grammar_bench.cpp), for a side-by-side cost per token: each
step applies the grammar to the whole vocabulary (llama_sampler_apply, the call timed), then
takes a random allowed token (the end where allowed, 1 time in 8). One JSON line.

    moesh grammar --json-object > /tmp/json.gbnf
    python3 scripts/bench/grammar_bench_llamacpp.py --gguf .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --grammar /tmp/json.gbnf [--steps 300]

Needs llama-cpp-python (see scripts/make_grammar_references.py for how it was built).
"""
import argparse
import ctypes
import json
import random
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--grammar", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    import llama_cpp as ll

    ll.llama_backend_init()
    p = ll.llama_model_default_params()
    p.vocab_only = True
    model = ll.llama_model_load_from_file(args.gguf.encode(), p)
    vocab = ll.llama_model_get_vocab(model)
    n = ll.llama_vocab_n_tokens(vocab)
    text = open(args.grammar, encoding="utf-8").read()
    rng = random.Random(args.seed)
    eog = [t for t in range(n) if ll.llama_vocab_is_eog(vocab, t)]

    def fresh():
        return ll.llama_sampler_init_grammar(vocab, text.encode(), b"root")

    smpl = fresh()
    data = (ll.llama_token_data * n)()
    times, n_allowed, walks = [], 0, 0
    for _ in range(args.steps):
        for i in range(n):
            data[i].id, data[i].logit, data[i].p = i, 0.0, 0.0
        arr = ll.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(ll.llama_token_data)), size=n, selected=-1,
                                        sorted=False)
        t0 = time.perf_counter()
        ll.llama_sampler_apply(smpl, ctypes.byref(arr))
        times.append((time.perf_counter() - t0) * 1e6)
        allowed = [data[i].id for i in range(n) if data[i].logit != float("-inf")]
        n_allowed += len(allowed)
        end_ok = any(t in eog for t in allowed)
        choices = [t for t in allowed if t not in eog]
        if not choices or (end_ok and rng.randrange(8) == 0):
            ll.llama_sampler_free(smpl)
            smpl = fresh()
            walks += 1
            continue
        ll.llama_sampler_accept(smpl, rng.choice(choices))
    times.sort()
    print(json.dumps({"bench": "grammar_llamacpp", "llama_cpp_python": ll.__version__, "gguf": args.gguf, "n_vocab": n,
                      "grammar": args.grammar, "steps": args.steps, "walks_finished": walks,
                      "mean_allowed": n_allowed / args.steps, "apply_us_mean": sum(times) / len(times),
                      "apply_us_p50": times[len(times) // 2], "apply_us_p99": times[min(len(times) - 1, int(0.99 * len(times)))]}))


if __name__ == "__main__":
    main()
