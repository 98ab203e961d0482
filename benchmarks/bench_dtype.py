"""float32 against bfloat16 weights on the embedded model: the time of each kind of work, and
how much the measurements move.

    .venv/bin/python benchmarks/bench_dtype.py [--coeff 1.0] [--out benchmarks/results/dtype.md]

For each dtype, in one process, one after the other: the base eval and a steered eval (the
committed gate-2 vector at `--coeff`) on the default preset's vignettes, one sampled generation
batch (16 completions x gen_max_new_tokens, steered, seeded) and the filter's perplexity pass
over it. Prints seconds per item for both dtypes with their ratio, and every foundation's nats
and the coherence under both, for base and steered. Nothing gates on these numbers.
"""

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VECTOR = REPO / "journal" / "2026-11-26_02_generate_filter_smollm2-135m-instruct" / "vector_r0.pt"


def measure(dtype: str, coeff: float) -> dict:
    import torch

    from shl import demos, filter as filt, steer
    from shl.mfv import eval_kwargs, evaluate
    from shl.models import load_model
    from shl.params import load_params

    p = load_params("default", dtype=dtype)
    model, tok = load_model(p.model, dtype, "cpu")
    vec = steer.Vector.load(VECTOR)
    demo = demos.load_demo(p)
    out = {"threads": torch.get_num_threads()}
    t = time.time()
    out["base"] = evaluate(model, tok, progress=False, **eval_kwargs(p)).summary
    out["t_eval"] = time.time() - t
    with steer.steer(model, vec, coeff):
        out["steered"] = evaluate(model, tok, progress=False, **eval_kwargs(p)).summary
    t = time.time()
    recs = filt.steered_batch(model, tok, vec, coeff, demo.prompt_pool[:16], p, seed=0, progress=False)
    out["t_generate"] = time.time() - t
    t = time.time()
    filt.judge(model, tok, recs, p)
    out["t_judge"] = time.time() - t
    out["kept"] = sum(r["kept"] for r in recs)
    return out


def main():
    from shl.params import FOUNDATIONS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coeff", type=float, default=1.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dtype.md"))
    args = ap.parse_args()
    res = {d: measure(d, args.coeff) for d in ("float32", "bfloat16")}
    f32, b16 = res["float32"], res["bfloat16"]
    lines = [f"# float32 vs bfloat16 weights, embedded model, {f32['threads']} torch threads\n",
             "| work | float32 (s) | bfloat16 (s) | ratio |", "|---|---|---|---|"]
    for key, name in (("t_eval", "eval (default vignettes, both orders)"),
                      ("t_generate", "generate 16 sampled completions, steered"),
                      ("t_judge", "filter perplexity pass over them")):
        lines.append(f"| {name} | {f32[key]:.1f} | {b16[key]:.1f} | {f32[key] / b16[key]:.2f}x |")
    lines += ["", f"Kept by the filter: {f32['kept']}/16 (float32), {b16['kept']}/16 (bfloat16); the samples differ "
              "(another dtype, other logits), so this is not a like-for-like count.", "",
              "| eval | key | float32 | bfloat16 | difference |", "|---|---|---|---|---|"]
    for stage in ("base", "steered"):
        for key in ["coherence"] + [f"{f}_nats" for f in FOUNDATIONS]:
            a, b = f32[stage][key], b16[stage][key]
            lines.append(f"| {stage} | {key} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    for dt in ("float32", "bfloat16"):
        r = res[dt]
        lines.append(f"\n{dt}: steered - base authority_nats {r['steered']['authority_nats'] - r['base']['authority_nats']:+.4f}, "
                     f"coherence ratio {r['steered']['coherence'] / r['base']['coherence']:.4f}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
