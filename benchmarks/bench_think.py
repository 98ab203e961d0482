"""Benchmark the thinking eval: the answer read from the generation's KV cache against re-encoding.

    .venv/bin/python benchmarks/bench_think.py [--n 66] [--think 16 128] [--out benchmarks/results/bench_think.md]

Both paths think the same greedy tokens for the same vignettes (both option orders), batch 16,
the default preset's model and dtype. Re-encoding is how the eval read before: decode the
thought, render the conversation again (thought, 'Just answer.', prefill) and score it from the
start with the vignette scorer (its shared chat-template prefix cached). The cache path
(shl.mfv.thinking_scorer) feeds only the answer turn after each row's own thought. Rows/s counts
vignette x order prompts. The two differ a little in value: re-encoding strips and re-tokenises
the thought text; the cache path keeps the generated ids (the test suite checks it equals a
re-encode of those same ids within 1e-4 in float32).
"""

import argparse
import time

import numpy as np
import torch

from shl import mfv
from shl.generate import generate_texts
from shl.models import chat_prompt, load_model
from shl.params import load_params


def reencoded(model, tok, users, think, batch_size):
    thoughts = generate_texts(model, tok, [chat_prompt(tok, u) for u in users], think, batch_size=batch_size,
                              progress=False)
    prompts = [chat_prompt(tok, mfv.JUST_ANSWER, history=[{"role": "user", "content": u},
                                                          {"role": "assistant", "content": t.strip()}],
                           prefill=mfv.PREFILL) for u, t in zip(users, thoughts)]
    return mfv.model_scorer(model, tok, prompts, mfv.OPTIONS, batch_size=batch_size)[0]


def cached(model, tok, users, think, batch_size):
    return mfv.thinking_scorer(model, tok, [chat_prompt(tok, u) for u in users], mfv.answer_suffix(tok, None),
                               think, mfv.OPTIONS, batch_size=batch_size)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=66, help="vignettes (the default preset's eval_n)")
    ap.add_argument("--think", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    p = load_params("default")
    model, tok = load_model(p.model, p.dtype, p.device, p.seed)
    texts = [v["text"] for v in mfv.load_vignettes(args.n)]
    users = [mfv.user_message(t, presented) for presented in mfv.ORDERS.values() for t in texts]
    lines = [f"# bench_think: {p.model} {p.dtype}, {len(users)} prompts ({args.n} vignettes x 2 orders), "
             f"batch {args.batch_size}, {torch.get_num_threads()} torch threads", "",
             "| think tokens | re-encode s | cache s | re-encode rows/s | cache rows/s | ratio | max abs d logp | mean abs d p |",
             "|---|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for think in args.think:
            t0 = time.time()
            old = reencoded(model, tok, users, think, args.batch_size)
            t_old = time.time() - t0
            t0 = time.time()
            new = cached(model, tok, users, think, args.batch_size)
            t_new = time.time() - t0
            dp = np.abs(np.exp(old) / np.exp(old).sum(1, keepdims=True) - np.exp(new) / np.exp(new).sum(1, keepdims=True))
            lines.append(f"| {think} | {t_old:.1f} | {t_new:.1f} | {len(users) / t_old:.2f} | {len(users) / t_new:.2f} | "
                         f"{t_old / t_new:.2f}x | {np.abs(old - new).max():.3f} | {dp.mean():.4f} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        open(args.out, "w").write(report)


if __name__ == "__main__":
    main()
