#!/usr/bin/env python3
"""Generate GGUF block-quantization fixtures for tests/experts/quant_test.cpp.

Usage:
    python3 scripts/make_quant_fixtures.py [--out tests/fixtures/quant]

Requirements: numpy and the `gguf` package (its gguf.quants module is the
reference: a NumPy port of ggml's ggml-quants.c). The C++ tests only read the
committed files.

Per type, raw little-endian files (row-major, [n_rows, n_per_row]):
  <type>.input.f32    float32 input rows       (types gguf can quantize)
  <type>.blocks.bin   the rows' block bytes     (gguf's quantization of the input,
                                                 or random-but-valid blocks for K-quants)
  <type>.dequant.f32  float32, gguf's dequantization of the block bytes
plus fp16.input.f32 / fp16.bits.u16 (numpy's float32 -> float16 cast) and
manifest.json describing every file, the rows and the package versions.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

SEED = 20240611
QUANTIZABLE = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
K_QUANTS = {"q4_K": T.Q4_K, "q5_K": T.Q5_K, "q6_K": T.Q6_K}
N_PER_ROW = 256  # 8 blocks of 32, or 1 super-block of 256


def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "unknown"


def block_edge_rows(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Rows of N_PER_ROW floats, each aimed at one rounding or scale corner."""
    n = N_PER_ROW
    rows = []
    rows.append(("normal(0, 1)", rng.standard_normal(n)))
    rows.append(("all zeros", np.zeros(n)))

    x = rng.standard_normal(n)
    x[37] = 1.0e4
    rows.append(("normal with a 1e4 outlier at index 37 (block 1)", x))

    x = rng.standard_normal(n)
    for b in range(n // 32):
        blk = x[32 * b:32 * b + 32]
        blk[(5 * b) % 32] = -(np.abs(blk).max() + 0.5)
    # equal magnitudes of both signs: the first one wins (Q4_0 keeps its sign)
    x[224:256] = rng.uniform(-1, 1, 32)
    x[230], x[240] = 2.5, -2.5
    x[192:224] = rng.uniform(-1, 1, 32)
    x[200], x[210] = -2.5, 2.5
    rows.append(("each block's max-abs element negative; blocks 6/7 have a +-2.5 tie", x))

    x = rng.standard_normal(n)
    x[:64] *= 1e-5   # scales become fp16 subnormals
    x[64:128] *= 3e-6  # scales near the smallest fp16 subnormal (2^-24)
    x[128:] *= 1e-6  # scales round to zero
    rows.append(("tiny values: fp16-subnormal scales", x))

    x = rng.uniform(-1, 1, n) * np.repeat(10.0 ** rng.uniform(-3, 3, n // 32), 32)
    rows.append(("uniform, block magnitudes 1e-3..1e3", x))

    x = np.zeros(n)
    # Q8_0 ties: amax 127 gives d = 1, so x.5 lands on a tie (rounds away from zero)
    x[0:32] = rng.integers(-126, 126, 32) + 0.5
    x[0], x[1] = 127, -3.5
    # Q4_0: max -8 gives d = 1 and id = 1
    x[32:64] = rng.integers(-8, 8, 32) + 0.5
    x[32] = -8
    # Q4_1: min 0, max 15 gives d = 1
    x[64:96] = rng.integers(0, 15, 32) + 0.5
    x[64], x[65] = 0, 15
    x[96:128] = 0.75  # constant block: Q4_1 d = 0
    x[128:160] = -1.25
    x[160:] = rng.standard_normal(96)
    rows.append(("exact ties (d = 1 per type), constant blocks", x))
    return [(name, r.astype(np.float32)) for name, r in rows]


def random_k_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random bytes, with every fp16 scale replaced by a sane finite value."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)

    def scale(i: int) -> np.float16:
        if i == 1:
            return np.float16(0.0)
        if i == 2:
            return np.float16(3.0e-6)  # an fp16 subnormal
        mag = 10.0 ** rng.uniform(-4, -0.5)
        return np.float16(-mag if i == 3 else mag)

    if qtype == T.Q6_K:
        offsets = [208]          # ql, qh, scales, then d
    else:
        offsets = [0, 2]         # d, dmin first
    for i in range(n_blocks):
        for k, off in enumerate(offsets):
            s = scale(i) if k == 0 else scale((i + 2) % n_blocks)
            blocks[i, off:off + 2] = np.array([s], dtype=np.float16).view(np.uint8)
    return blocks


def scale_kind(i: int) -> str:
    """What random_k_blocks' scale(i) is."""
    return {1: "= 0", 2: "subnormal (3e-6)", 3: "negative"}.get(i, "random in 1e-4..0.3")


def fp16_inputs(rng: np.random.Generator) -> np.ndarray:
    """Floats over the whole fp16 range and around its rounding boundaries."""
    vals = [
        0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, np.inf, -np.inf,
        2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -26, 1e-30, 1e-45,
        1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20,
    ]
    # every half-way point between adjacent fp16 values (ties), and a hair either side
    h = np.arange(0, 0x7c00, 97, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((h[:-1] + np.nextafter(h[:-1].astype(np.float16), np.float16(np.inf)).astype(np.float64)) / 2)
    mids = mids.astype(np.float32)
    randoms = (rng.standard_normal(2000) * 10.0 ** rng.uniform(-9, 5, 2000)).astype(np.float32)
    out = np.concatenate([np.array(vals, dtype=np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                          np.nextafter(mids, np.float32(0)), -mids, randoms])
    return out.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    manifest = {
        "generator": "scripts/make_quant_fixtures.py",
        "seed": SEED,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "gguf": gguf_version()},
        "types": {},
    }

    rows = block_edge_rows(rng)
    inputs = np.stack([r for _, r in rows])  # [n_rows, N_PER_ROW]
    for name, qtype in QUANTIZABLE.items():
        blocks = quants.quantize(inputs, qtype)        # [n_rows, row_bytes] uint8
        dequant = quants.dequantize(blocks, qtype)     # [n_rows, N_PER_ROW] float32
        assert blocks.dtype == np.uint8 and dequant.dtype == np.float32
        inputs.astype("<f4").tofile(out / f"{name}.input.f32")
        blocks.tofile(out / f"{name}.blocks.bin")
        dequant.astype("<f4").tofile(out / f"{name}.dequant.f32")
        manifest["types"][name] = {
            "ggml_type": int(qtype), "n_rows": len(rows), "n_per_row": N_PER_ROW,
            "row_bytes": int(blocks.shape[1]), "input": f"{name}.input.f32",
            "blocks": f"{name}.blocks.bin", "dequant": f"{name}.dequant.f32",
            "rows": [n for n, _ in rows],
        }

    n_k_rows = 6
    for name, qtype in K_QUANTS.items():
        blocks = random_k_blocks(rng, qtype, n_k_rows)  # one super-block per row
        dequant = quants.dequantize(blocks, qtype)
        assert dequant.dtype == np.float32 and np.isfinite(dequant).all()
        blocks.tofile(out / f"{name}.blocks.bin")
        dequant.astype("<f4").tofile(out / f"{name}.dequant.f32")
        manifest["types"][name] = {
            "ggml_type": int(qtype), "n_rows": n_k_rows, "n_per_row": N_PER_ROW,
            "row_bytes": int(blocks.shape[1]), "input": None,
            "blocks": f"{name}.blocks.bin", "dequant": f"{name}.dequant.f32",
            "rows": [f"random bytes; d {scale_kind(i)}" + ("" if qtype == T.Q6_K else f", dmin {scale_kind((i + 2) % n_k_rows)}")
                     for i in range(n_k_rows)],
        }

    f = fp16_inputs(rng)
    f.astype("<f4").tofile(out / "fp16.input.f32")
    with np.errstate(over="ignore"):  # overflow to infinity is part of the test
        f.astype(np.float16).view("<u2").tofile(out / "fp16.bits.u16")
    manifest["fp16"] = {"n": int(f.size), "input": "fp16.input.f32", "bits": "fp16.bits.u16",
                        "note": "numpy float32 -> float16 cast (round to nearest even)"}

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
