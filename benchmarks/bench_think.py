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

tinymfv itself is not installable here (not on PyPI), so `--tinymfv` times a stand-in written from
the description of its `evaluate` (github.com/wassname/tinymfv, src/tinymfv/guided.py, the
forced-choice rollout): batches of 8 (its default), greedy thinking of exactly the budget (its
min_new_tokens equals max_new_tokens; the end of turn cannot stop it) with the per-step scores kept,
then two short passes on the generation's cache (the close of the turn and 'Just answer' with the
cache extended, the prefill without), and the first answer token read at the last position. Same
prompts, same model; its numbers are not ours (a first-token readout), only its speed is compared.
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


def tinymfv_style(model, tok, users, think, batch_size=8):
    """Seconds are what matter: the stand-in for tinymfv's evaluate described in the docstring."""
    suffix = mfv.answer_suffix(tok, None)
    scaffold = tok(suffix[:-len(mfv.PREFILL)], add_special_tokens=False).input_ids
    prefill = tok(mfv.PREFILL, add_special_tokens=False).input_ids
    first = [tok(w, add_special_tokens=False).input_ids[0] for w in mfv.OPTIONS]
    old, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for start in range(0, len(users), batch_size):
            enc = tok([chat_prompt(tok, u) for u in users[start:start + batch_size]], return_tensors="pt",
                      padding=True, add_special_tokens=False)
            B = enc.input_ids.shape[0]
            gen = model.generate(**enc, max_new_tokens=think, min_new_tokens=think, do_sample=False, top_k=None,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            attn = torch.cat([enc.attention_mask, torch.ones((B, gen.sequences.shape[1] - enc.input_ids.shape[1]),
                                                              dtype=torch.long)], 1)
            for feed_ids, extend in ((scaffold, True), (prefill, False)):
                feed = torch.tensor([feed_ids] * B)
                if extend:  # the last generated token is not in the cache yet
                    feed = torch.cat([gen.sequences[:, -1:], feed], 1)
                    attn_in = torch.cat([attn, torch.ones((B, feed.shape[1] - 1), dtype=torch.long)], 1)
                else:
                    attn_in = torch.cat([attn, torch.ones((B, feed.shape[1]), dtype=torch.long)], 1)
                pos = (attn_in.cumsum(1) - 1)[:, -feed.shape[1]:]
                res = model(input_ids=feed, attention_mask=attn_in, position_ids=pos, past_key_values=gen.past_key_values,
                            use_cache=extend)
                if extend:
                    attn = attn_in
            out.append(res.logits[:, -1].float().log_softmax(-1)[:, first])
    finally:
        tok.padding_side = old
    return torch.cat(out).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=66, help="vignettes (the default preset's eval_n)")
    ap.add_argument("--think", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="")
    ap.add_argument("--tinymfv", action="store_true", help="also time the tinymfv stand-in (batch 8)")
    ap.add_argument("--no-reencode", action="store_true", help="skip the re-encoding path (measured before)")
    args = ap.parse_args()
    p = load_params("default")
    model, tok = load_model(p.model, p.dtype, p.device, p.seed)
    texts = [v["text"] for v in mfv.load_vignettes(args.n)]
    users = [mfv.user_message(t, presented) for presented in mfv.ORDERS.values() for t in texts]
    lines = [f"# bench_think: {p.model} {p.dtype}, {len(users)} prompts ({args.n} vignettes x 2 orders), "
             f"batch {args.batch_size}, {torch.get_num_threads()} torch threads", "",
             "| think tokens | re-encode s | cache s | tinymfv stand-in s | re-encode rows/s | cache rows/s | "
             "tinymfv stand-in rows/s | cache vs re-encode | cache vs tinymfv | max abs d logp | mean abs d p |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    with torch.no_grad():
        for think in args.think:
            t0 = time.time()
            new = cached(model, tok, users, think, args.batch_size)
            t_new = time.time() - t0
            t_old = t_tiny = nan
            d_logp = d_p = nan
            if not args.no_reencode:
                t0 = time.time()
                old = reencoded(model, tok, users, think, args.batch_size)
                t_old = time.time() - t0
                dp = np.abs(np.exp(old) / np.exp(old).sum(1, keepdims=True) - np.exp(new) / np.exp(new).sum(1, keepdims=True))
                d_logp, d_p = np.abs(old - new).max(), dp.mean()
            if args.tinymfv:
                t0 = time.time()
                tinymfv_style(model, tok, users, think)
                t_tiny = time.time() - t0
            n = len(users)
            lines.append(f"| {think} | {t_old:.1f} | {t_new:.1f} | {t_tiny:.1f} | {n / t_old:.2f} | {n / t_new:.2f} | "
                         f"{n / t_tiny:.2f} | {t_old / t_new:.2f}x | {t_tiny / t_new:.2f}x | {d_logp:.3f} | {d_p:.4f} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        open(args.out, "w").write(report)


if __name__ == "__main__":
    main()
