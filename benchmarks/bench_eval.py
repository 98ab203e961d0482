"""Benchmark the MFV eval: the batched, prefix-cached readout vs the naive one, same process.

    .venv/bin/python benchmarks/bench_eval.py [--n 132] [--batch-size 16]

Naive = one forward pass per prompt, order and option; no batching, no reuse of the shared
prefix. Reports wall time of both, the ratio, and the max |difference| in p (must be < 1e-4).
Also times the first (GGUF conversion) and second (cached) load of the embedded model.
"""

import argparse
import os
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=0, help="vignettes (0 = all 132)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    os.environ["SHL_CACHE"] = tempfile.mkdtemp(prefix="shl-bench-cache-")  # force a first-time conversion
    from shl import mfv
    from shl.models import load_model

    t0 = time.time()
    load_model("smollm2-135m-instruct", "float32", "cpu")
    t_first = time.time() - t0
    t0 = time.time()
    model, tok = load_model("smollm2-135m-instruct", "float32", "cpu")
    t_second = time.time() - t0
    print(f"model load: first (GGUF -> safetensors) {t_first:.1f}s, second (cached) {t_second:.2f}s")

    fast = mfv.evaluate(model, tok, n=args.n, batch_size=args.batch_size, progress=False)
    naive = mfv.evaluate(model, tok, n=args.n, progress=False,
                         scorer=lambda prompts, presented: mfv.naive_scorer(model, tok, prompts, presented))
    cols = [f"p_{f}" for f in mfv.FOUNDATIONS]
    dp = np.abs(fast.table()[cols].to_numpy() - naive.table()[cols].to_numpy()).max()
    t_fast, t_naive = fast.summary["seconds"], naive.summary["seconds"]
    n = fast.summary["n"]
    print(f"eval of {n} vignettes x 2 orders (thinking off): batched {t_fast:.1f}s, naive {t_naive:.1f}s, "
          f"ratio {t_naive / t_fast:.1f}x, max |dp| {dp:.2e}")
    print("base profile:", {f: round(v, 4) for f, v in fast.profile.items()})
    print("human profile:", {f: round(v, 4) for f, v in fast.human_profile.items()})
    print({k: round(v, 4) for k, v in fast.summary.items()})


if __name__ == "__main__":
    main()
