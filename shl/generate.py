"""Batched generation: one `generate` call per batch, left-padded."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from shl.history import reads_merged
from shl.models import input_device


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
@reads_merged
def generate_texts(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   progress: bool = True, desc: str = "generate"):
    """Completions (special tokens stripped) for rendered prompts; greedy unless do_sample.

    No repetition penalty: repetition is a symptom the filter must see, not hide.
    """
    old_side, tok.padding_side = tok.padding_side, "left"
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    outputs = []
    try:
        for chunk in tqdm(list(batches(prompts, batch_size)), desc=desc, disable=not progress, leave=False):
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(input_device(model))
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 top_k=None, **sampling)
            # [B, prompt_len + new]: under left padding every prompt ends at the same column
            outputs += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return outputs


# --- walk-C: cool the dose until enough completions survive the filter ----------------------

class Starved(RuntimeError):
    """Fewer than min_train survivors after gen_max_batches batches."""


def survival_table(trace: list[dict]) -> str:
    """Per-kappa survival, one line per batch, for errors and reports."""
    lines = ["phase   kappa   generated  kept  survival"]
    lines += [f"{t['phase']:<7} {t['kappa']:<7.4f} {t['generated']:>9}  {t['kept']:>4}  {t['kept'] / max(t['generated'], 1):.2f}"
              for t in trace]
    return "\n".join(lines)


def walk_c(generate_batch, p, on_starve=None) -> tuple[list[dict], float, list[dict]]:
    """Bisect the dose multiplier kappa in log space, then collect at the settled kappa.

    `generate_batch(kappa, n, batch_index)` returns n judged records (each with `kept`).
    Probe batches of `gen_probe_size` at kappa = 1, then between `kappa_min` and 1 for
    `walk_iters` steps: a probe whose survival reaches `gen_pass_target` raises the floor
    (more dose is affordable), else lowers the ceiling. Every survivor of every batch is banked.
    Then full batches at the settled kappa (the highest that passed, else `kappa_min`) until
    `n_keep` survivors or `gen_max_batches` batches in all. Fewer than `min_train` raises
    Starved with the survival table, after `on_starve(trace)` had the chance to save it.
    Returns (kept records, settled kappa, trace)."""
    kept, trace = [], []

    def run(kappa, n, phase):
        recs = generate_batch(kappa, n, len(trace))
        survivors = [r for r in recs if r["kept"]]
        kept.extend(survivors)
        trace.append({"phase": phase, "kappa": kappa, "generated": len(recs), "kept": len(survivors)})
        return len(survivors) / max(len(recs), 1)

    lo, hi = math.log(p.kappa_min), 0.0
    passed = []
    if run(1.0, p.gen_probe_size, "probe") >= p.gen_pass_target:
        passed.append(0.0)
    else:
        for _ in range(p.walk_iters):
            if len(trace) >= p.gen_max_batches:
                break
            mid = (lo + hi) / 2
            if run(math.exp(mid), p.gen_probe_size, "probe") >= p.gen_pass_target:
                passed.append(mid)
                lo = mid
            else:
                hi = mid
    kappa = math.exp(max(passed)) if passed else p.kappa_min
    while len(kept) < p.n_keep and len(trace) < p.gen_max_batches:
        run(kappa, p.gen_batch_size, "collect")
    if len(kept) < p.min_train:
        if on_starve is not None:
            on_starve(trace)
        raise Starved(f"only {len(kept)} survivors (min_train {p.min_train}) after {len(trace)} batches; "
                      f"lower kappa_min, loosen the filter or raise gen_max_batches\n{survival_table(trace)}")
    return kept, kappa, trace
