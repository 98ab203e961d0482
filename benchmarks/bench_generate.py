"""Benchmark batched generation against one completion at a time (the research repo's way).

    .venv/bin/python benchmarks/bench_generate.py [--prompts 32] [--tokens 64] [--batch-size 32]

Same model (the embedded SmolLM2), same prompts, same length (min_new_tokens = max_new_tokens
so both produce exactly prompts x tokens new tokens), greedy. Reports tokens/s of both and the ratio;
then the steering hook's overhead: tokens/s with the hook on against off (same batch and length).
"""

import argparse
import time

import torch

from shl.demos import load_demo
from shl.models import chat_prompt, input_device, load_model
from shl.params import load_params


def run(model, tok, prompts, tokens, batch_size):
    tok.padding_side = "left"
    t0 = time.time()
    new = 0
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(input_device(model))
        out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        new += (out.shape[1] - enc.input_ids.shape[1]) * out.shape[0]
    return new, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="hook on/off pairs for the overhead")
    args = ap.parse_args()
    p = load_params("default")
    model, tok = load_model(p.model, p.dtype, "cpu")
    demo = load_demo(p)
    prompts = [chat_prompt(tok, u) for u in demo.prompt_pool[:args.prompts]]
    with torch.no_grad():
        run(model, tok, prompts[:2], 4, 2)  # warm-up
        n_b, t_b = run(model, tok, prompts, args.tokens, args.batch_size)
        n_s, t_s = run(model, tok, prompts, args.tokens, 1)
    print(f"{args.prompts} prompts x {args.tokens} tokens: batched (batch {args.batch_size}) {n_b / t_b:.1f} tok/s "
          f"({t_b:.1f}s), one at a time {n_s / t_s:.1f} tok/s ({t_s:.1f}s), ratio {(n_b / t_b) / (n_s / t_s):.1f}x")
    hook_overhead(model, tok, prompts, args)


def hook_overhead(model, tok, prompts, args):
    """Generation tokens/s with the steering hook on (the committed gate-2 vector, its layers)
    against off, same prompts, batch and length, interleaved so drift in the machine's load
    hits both; the median of --repeats each."""
    import statistics
    from pathlib import Path
    from shl.steer import Vector, steer
    vec = Vector.load(Path(__file__).resolve().parent.parent / "journal" /
                      "2026-11-26_02_generate_filter_smollm2-135m-instruct" / "vector_r0.pt")
    times = {"off": [], "on": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                with steer(model, vec if mode == "on" else None, 1.0):
                    n, t = run(model, tok, prompts[:args.batch_size], args.tokens, args.batch_size)
                times[mode].append(t)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"steering hook on {len(vec.layers)} layers, batch {args.batch_size} x {args.tokens} tokens: "
          f"{n / off:.1f} tok/s off, {n / on:.1f} tok/s on, overhead {on / off - 1:+.1%} (median of {args.repeats})")


if __name__ == "__main__":
    main()
