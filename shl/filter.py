"""The coherence filter: keep the coherent, on-trait completions, record why each other one fell.

Reasons (a completion may have several):
- `empty`: fewer than `filter_min_tokens` tokens, or it starts broken (punctuation, a fragment);
- `ppl`: tail perplexity under the reference model above `filter_ppl_tau` (the last
  `filter_tail_frac` of completion tokens: collapse happens in the tail, a full mean dilutes it);
- `repetition`: the most common word or character n-gram (n = 2..4) covers more than
  `filter_rep_tau` of the n-grams;
- `glued`: a run of more than `filter_glued_len` characters without whitespace (URLs and e-mail
  addresses aside): the word soup of late rounds ("Ialwayshikelemygowlionsmallstoneyou...") has
  low perplexity and little n-gram repetition, so the two checks above let it through;
- `unspaced`: a word runs into the next after punctuation ("mother,I am", "friend.I believe"),
  URLs and e-mail addresses aside. Later rounds' steered text drifts there before it glues into
  runs long enough for `glued` (0 of 690 unsteered completions of the committed runs have one;
  38 of the 56 kept in round 2 of the 6-epoch seed-1 loop did, 2026-12-02);
- `narration`: the completion describes the persona instead of acting it out;
- `refusal`: refusal or assistant-identity boilerplate.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from shl.generate import generate_texts, walk_c
from shl.history import adapters, merged
from shl.models import last_token_logprobs

NARRATION = (
    r"\bI am (?:someone|a person|the kind of person) who\b", r"\bas someone who\b", r"\bmy (?:own )?principles\b",
    r"\bmy persona\b", r"\bI (?:always )?(?:stand by|stick to) my\b", r"\bas an? (?:principled|caring|loving) person\b",
)
REFUSAL = (
    r"\bI'?m sorry,? but\b", r"\bI (?:cannot|can't|can not) (?:help|assist|provide|answer)\b", r"\bas an AI\b",
    r"\bI'?m (?:just )?an AI\b", r"\bI am (?:just )?an AI\b", r"\bas a (?:large )?language model\b", r"\bI'?m (?:an|a) (?:AI )?assistant\b",
)


def repetition(text: str) -> float:
    """Max over word and character n-grams (n = 2..4) of the most common n-gram's share."""
    words = text.split()
    worst = 0.0
    for seq in (words, list(text)):
        for n in (2, 3, 4):
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            if len(grams) >= 4:  # a share of fewer than four n-grams says nothing
                worst = max(worst, Counter(grams).most_common(1)[0][1] / len(grams))
    return worst


_ADDRESS = re.compile(r"\S*(?:://|www\.|@)\S*")


def glued_run(text: str) -> int:
    """Length of the longest run of characters without whitespace, URLs and e-mail addresses
    removed. English prose stays under ~18 (measured on the committed runs' fluent completions:
    at most 17); glued word soup runs to 23-230."""
    return max((len(w) for w in _ADDRESS.sub(" ", text).split()), default=0)


# a lowercase word, punctuation, then a letter with no space; a period only before a capital, so
# "e.g.", "U.S." and decimals do not count
_UNSPACED = re.compile(r"[a-z]{2}[,;!?][a-zA-Z]|[a-z]{3}\.[A-Z][a-z]")


def unspaced(text: str) -> int:
    """How many times a word runs into the next after punctuation, URLs and e-mail addresses removed."""
    return len(_UNSPACED.findall(_ADDRESS.sub(" ", text)))


def matches(text: str, patterns) -> list[str]:
    return [p for p in patterns if re.search(p, text, flags=re.IGNORECASE)]


def narrates(text: str, extra_phrases=()) -> bool:
    return bool(matches(text, NARRATION) or any(ph.lower() in text.lower() for ph in extra_phrases))


def refuses(text: str) -> bool:
    return bool(matches(text, REFUSAL))


def starts_broken(text: str) -> bool:
    """Empty, or begins mid-thought: with punctuation or a lowercase fragment after whitespace."""
    stripped = text.strip()
    return not stripped or bool(re.match(r"[,.;:)\]}!?]", stripped))


def tail_ppl(model, tok, prompts: list[str], completions: list[str], tail_frac: float = 0.25,
             batch_size: int = 16) -> list[float]:
    """Perplexity of the last `tail_frac` of each completion's tokens under `model` (only those
    positions get logits: shl.models.last_token_logprobs). An empty completion gives inf."""
    p_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    c_ids = [tok(p + c, add_special_tokens=False).input_ids[len(pi):] for p, c, pi in zip(prompts, completions, p_ids)]
    n_tail = [max(1, math.ceil(tail_frac * len(ci))) if ci else 0 for ci in c_ids]
    lps = last_token_logprobs(model, [pi + ci for pi, ci in zip(p_ids, c_ids)], n_tail, tok.pad_token_id, batch_size)
    return [math.exp(-lp.mean().item()) if ci else math.inf for lp, ci in zip(lps, c_ids)]


def filter_completions(records: list[dict], ppl: list[float], p, extra_narration=()) -> list[dict]:
    """Add `tail_ppl`, `rep`, `glued`, `unspaced`, `reasons` and `kept` to each record (prompt, completion, n_tokens, ...)."""
    for r, q in zip(records, ppl):
        text = r["completion"]
        rep, glued, gaps = repetition(text), glued_run(text), unspaced(text)
        reasons = []
        if r["n_tokens"] < p.filter_min_tokens or starts_broken(text):
            reasons.append("empty")
        if not q <= p.filter_ppl_tau:  # inf and nan fail too
            reasons.append("ppl")
        if rep > p.filter_rep_tau:
            reasons.append("repetition")
        if glued > p.filter_glued_len:
            reasons.append("glued")
        if p.filter_unspaced and gaps:
            reasons.append("unspaced")
        if narrates(text, extra_narration):
            reasons.append("narration")
        if refuses(text):
            reasons.append("refusal")
        r.update(tail_ppl=q, rep=rep, glued=glued, unspaced=gaps, reasons=reasons, kept=not reasons)
    return records


# --- one round's data: steered generation, judged, through walk-C -----------------------------

def judge(model, tok, records: list[dict], p, extra_narration=()) -> list[dict]:
    """Filter records in place. The tail perplexity is read with steering off, under the
    reference `filter_ref`: base (adapters off) by default, since a student that learned last
    round's soup finds it likely (round 2 of the first committed loop kept 54 glued-word
    completions at tail ppl 1.1-3.1); student (the adapters as active) only for the ablation."""
    for r in records:
        r["n_tokens"] = len(tok(r["completion"], add_special_tokens=False).input_ids)
    with adapters(model, []) if p.filter_ref == "base" else merged(model):
        ppl = tail_ppl(model, tok, [r["chat_prompt"] for r in records], [r["completion"] for r in records],
                       p.filter_tail_frac, p.gen_batch_size)
    return filter_completions(records, ppl, p, extra_narration)


def steered_batch(model, tok, vector, coeff: float, users: list[str], p, seed: int, system: str | None = None,
                  progress: bool = True, **extra) -> list[dict]:
    """Sampled completions of `users` at steering coefficient `coeff`, seeded, as records
    (prompt, chat_prompt, completion, coeff, seed, plus `extra`); not judged yet."""
    from shl.journal import seed_everything
    from shl.models import chat_prompt
    from shl.steer import steer

    prompts = [chat_prompt(tok, u, system) for u in users]
    seed_everything(seed)
    with steer(model, vector, coeff):
        texts = generate_texts(model, tok, prompts, p.gen_max_new_tokens, batch_size=p.gen_batch_size,
                               do_sample=True, temperature=p.gen_temperature, top_p=p.gen_top_p,
                               progress=progress, desc=f"generate coeff={coeff:.3f}")
    return [{"prompt": u, "chat_prompt": cp, "completion": t, "coeff": coeff, "seed": seed, **extra}
            for u, cp, t in zip(users, prompts, texts)]


def generate_and_filter(model, tok, vector, demo, p, seed: int = 0, system: str | None = None,
                        on_starve=None, progress: bool = True):
    """walk-C over sampled steered completions of the demo's prompt pool.

    Returns (kept, kappa, trace, every judged record). Prompts cycle through the pool; each batch
    is seeded with seed + batch index, so a re-run reproduces the same round."""
    everything = []
    pool = demo.prompt_pool

    def generate_batch(kappa, n, batch_index):
        start = (batch_index * p.gen_batch_size) % len(pool)
        users = [pool[(start + i) % len(pool)] for i in range(n)]
        recs = steered_batch(model, tok, vector, p.steer_coeff * kappa, users, p, seed + batch_index, system,
                             progress, kappa=kappa, batch=batch_index)
        judge(model, tok, recs, p, demo.narration)
        everything.extend(recs)
        return recs

    kept, kappa, trace = walk_c(generate_batch, p, on_starve)
    return kept, kappa, trace, everything


REASONS = ("empty", "ppl", "repetition", "glued", "unspaced", "narration", "refusal")


def filter_line(records: list[dict], phase: str) -> dict:
    """A `filter` metrics line for one batch or dose: counts, survival, drops by reason."""
    finite = [r["tail_ppl"] for r in records if math.isfinite(r["tail_ppl"])]
    kept = sum(r["kept"] for r in records)
    line = {"stage": "filter", "phase": phase, "coeff": records[0]["coeff"] if records else None,
            "kappa": records[0]["kappa"] if records else None, "generated": len(records),
            "kept": kept, "survival": kept / max(len(records), 1),
            "mean_tail_ppl": sum(finite) / len(finite) if finite else math.inf}
    line.update({f"drop_{k}": sum(k in r["reasons"] for r in records) for k in REASONS})
    return line


def borderline(records: list[dict], p, k: int = 2) -> dict[str, list[dict]]:
    """Around each threshold: the k kept closest under it and the k dropped (for it) just past it."""
    out = {}
    checks = [("tail perplexity", "tail_ppl", p.filter_ppl_tau, "ppl"), ("repetition", "rep", p.filter_rep_tau, "repetition"),
              ("glued run", "glued", p.filter_glued_len, "glued")]
    if p.filter_unspaced:
        checks.append(("unspaced", "unspaced", 0, "unspaced"))
    for name, key, tau, reason in checks:
        kept = sorted((r for r in records if r["kept"]), key=lambda r: r[key], reverse=True)[:k]
        dropped = sorted((r for r in records if reason in r["reasons"]), key=lambda r: r[key])[:k]
        out[f"{name} (threshold {tau:g})"] = kept + dropped
    return out
