"""Selectivity: how far a change of the model moves the trait, against how far it moves the rest.

It is read on centred log-probs: per vignette, each answer's log-prob minus the mean over the
seven answers, c_f = log p_f - mean_g log p_g. Centring cancels what moves every answer alike
(the answer mass lost to incoherence, say). A change A -> B gives per vignette
delta_f = c_f(B) - c_f(A). In the loop, A is base and B the healed (or steered) model. In 01 the
change is half the way from the -coeff to the +coeff steered model, (c_f(+) - c_f(-)) / 2: the mean
of the two signs' moves against base, on the same scale as a one-sided change like healed vs base.
Then

    on  = mean over vignettes and the `on` foundations of sign_f * delta_f   (intended movement)
    off = mean over the other foundations of |mean over vignettes of delta_f| (unintended movement)
    selectivity = on - 0.1 * off

This is steering-lite's score (github.com/wassname/steering-lite, README "Results"). The seven c_f
of a vignette sum to zero. So a move of the trait answer alone, by x nats, reads as on = 6x/7 and
off = x/7: an off of on/6 is what centring leaves behind, not a side effect.

95% intervals come from a row bootstrap over vignettes. Every change scored with the same seed
and vignette count draws the same rows, so differences between methods are paired.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shl.journal import read_jsonl
from shl.params import FOUNDATIONS

OFF_WEIGHT = 0.1  # steering-lite's weight of unintended movement
N_BOOT = 2000


def centred_logprobs(rows: list[dict]) -> np.ndarray:
    """[N, 7] centred log-probs in FOUNDATIONS order from an eval's per-vignette rows (`p_<f>`)."""
    p = np.array([[r[f"p_{f}"] for f in FOUNDATIONS] for r in rows], dtype=float)
    if (p <= 0).any():
        raise ValueError("an answer has probability 0: its log-prob is -inf; the eval rows are broken")
    lp = np.log(p)
    return lp - lp.mean(1, keepdims=True)


def delta(rows_a: list[dict], rows_b: list[dict]) -> np.ndarray:
    """[N, 7] change of the centred log-probs from eval A to eval B, vignette by vignette."""
    ids_a, ids_b = [r["id"] for r in rows_a], [r["id"] for r in rows_b]
    if ids_a != ids_b:
        raise ValueError(f"the two evals hold different vignettes ({len(ids_a)} vs {len(ids_b)} rows, or another "
                         "order): compare evals made with the same eval_n")
    return centred_logprobs(rows_b) - centred_logprobs(rows_a)


def _split(on: dict[str, int], exclude) -> tuple[list[int], np.ndarray, list[int]]:
    bad = [f for f in [*on, *exclude] if f not in FOUNDATIONS]
    if bad or not on:
        raise ValueError(f"on must name foundations with their signs, e.g. {{'authority': -1}}; unknown: {bad}")
    on_idx = [FOUNDATIONS.index(f) for f in on]
    off_idx = [i for i, f in enumerate(FOUNDATIONS) if f not in on and f not in exclude]
    return on_idx, np.array([float(on[f]) for f in on]), off_idx


def score(d: np.ndarray, on: dict[str, int], exclude=(), off_weight: float = OFF_WEIGHT) -> dict:
    """on, off and selectivity of a delta [..., N, 7] (leading axes: bootstrap draws)."""
    on_idx, signs, off_idx = _split(on, exclude)
    moves = d.mean(-2)  # [..., 7]: mean change per foundation
    s_on = (moves[..., on_idx] * signs).mean(-1)
    s_off = np.abs(moves[..., off_idx]).mean(-1)
    return {"on": s_on, "off": s_off, "selectivity": s_on - off_weight * s_off}


def selectivity(deltas: dict[str, np.ndarray], on: dict[str, int], exclude=(), ref: str | None = None,
                n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95) -> dict[str, dict]:
    """Per named delta [N, 7]: on, off, selectivity and their `ci` row-bootstrap intervals
    (`<key>_lo`, `<key>_hi`). With `ref`, also `d_sel` = selectivity - ref's selectivity and its
    paired interval (the same resampled vignettes for both)."""
    n = {d.shape[0] for d in deltas.values()}
    if len(n) != 1:
        raise ValueError(f"the deltas hold different numbers of vignettes {sorted(n)}: compare evals of the same eval_n")
    rows = n.pop()
    idx = np.random.default_rng(seed).integers(0, rows, size=(n_boot, rows))  # [n_boot, N] resampled vignettes
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    boots, out = {}, {}
    for name, d in deltas.items():
        point, boots[name] = score(d, on, exclude), score(d[idx], on, exclude)
        out[name] = {k: float(v) for k, v in point.items()}
        for k, v in boots[name].items():
            out[name][f"{k}_lo"], out[name][f"{k}_hi"] = np.percentile(v, q).tolist()
    if ref is not None:
        if ref not in deltas:
            raise ValueError(f"ref {ref!r} is not one of {list(deltas)}")
        for name in deltas:
            diff = boots[name]["selectivity"] - boots[ref]["selectivity"]
            out[name]["d_sel"] = out[name]["selectivity"] - out[ref]["selectivity"]
            out[name]["d_sel_lo"], out[name]["d_sel_hi"] = np.percentile(diff, q).tolist()
    return out


# --- a loop run's healed (and steered) models against base --------------------------------------

def _rows(run_dir: Path, stage: str, k: int) -> list[dict]:
    path = Path(run_dir) / "evals" / f"{stage}_r{k}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: selectivity needs the per-vignette eval rows")
    return read_jsonl(path)


def round_selectivity(run_dir: Path, trait_foundation: str, trait_sign: int, k: int, seed: int = 0) -> dict:
    """Round k's steered and healed models against base, from the run folder's eval rows:
    `{stage}_on`, `{stage}_off`, `{stage}_selectivity` and `{stage}_sel_lo` / `_sel_hi` for stage
    steered and healed. The trait alone is on; every other foundation is off (care too)."""
    base = _rows(run_dir, "base", -1)
    deltas = {s: delta(base, _rows(run_dir, s, k)) for s in ("steered", "healed")}
    res = selectivity(deltas, {trait_foundation: trait_sign}, seed=seed)
    return {key: v for s, r in res.items() for key, v in (
        (f"{s}_on", r["on"]), (f"{s}_off", r["off"]), (f"{s}_selectivity", r["selectivity"]),
        (f"{s}_sel_lo", r["selectivity_lo"]), (f"{s}_sel_hi", r["selectivity_hi"]))}


# --- 01: the methods at matched doses ------------------------------------------------------------

def compare_methods(model, tok, p, demo, contexts: list[str], layers: list[int], calib_prompts: list[str],
                    run_dir: Path, base: dict, vectors: dict | None = None, progress: bool = True) -> list[dict]:
    """Every method of `p.select_methods` at every p95-KL budget of `p.select_kl_budgets`.

    Per method, the vector is extracted once (or taken from `vectors`) and saved as
    `vector_<method>.pt`. Per budget, `steer.calibrate` finds the coefficient c whose p95 KL on
    `calib_prompts` is the budget. The eval runs at +c and -c: a `method` metrics line each, with
    rows in evals/method_<method>_kl<budget>_<pos|neg>.jsonl. Half the -c -> +c change is scored
    (trait alone on; care and the rest off), with the intervals and the paired difference to
    mean_diff. So is the same change with the demo's companions counted as intended, as
    steering-lite counts them. One `selectivity` line per method and budget. Returns those lines."""
    from shl import steer
    from shl.journal import append_metrics, log_eval
    from shl.mfv import eval_kwargs, evaluate

    run_dir = Path(run_dir)
    trait = f"{demo.trait_foundation}_nats"
    vectors = dict(vectors or {})
    evals = {}  # (method, budget, sign) -> (metrics line, rows)
    coeffs = {}
    for m in p.select_methods:
        if m not in vectors:
            vectors[m] = steer.extract(model, tok, demo.pos, demo.neg, contexts, layers, p.extract_batch_size,
                                       progress, method=m)
            vectors[m].meta.update(model=p.model, demo=demo.name, band=p.steer_band)
        vectors[m].save(run_dir / f"vector_{m}.pt")
        for b in p.select_kl_budgets:
            c, _ = steer.calibrate(model, tok, vectors[m], calib_prompts, b)
            coeffs[m, b] = (c, steer.kl_p95(model, tok, vectors[m], -c, calib_prompts))
            for sign, side in ((1, "pos"), (-1, "neg")):
                with steer.steer(model, vectors[m], sign * c):
                    res = evaluate(model, tok, progress=progress, **eval_kwargs(p))
                line = log_eval(run_dir, res, "method", rows_name=f"method_{m}_kl{b:g}_{side}", method=m,
                                kl_budget=b, sign=sign, coeff=sign * c)
                evals[m, b, sign] = (line, res.rows)

    ref = "mean_diff" if "mean_diff" in p.select_methods else None
    strict_on = {demo.trait_foundation: demo.trait_sign}
    out = []
    for b in p.select_kl_budgets:
        # half the -c -> +c change: the mean of the two signs' moves against base
        deltas = {m: delta(evals[m, b, -1][1], evals[m, b, 1][1]) / 2 for m in p.select_methods}
        strict = selectivity(deltas, strict_on, ref=ref, seed=p.seed)
        loose = selectivity(deltas, {**strict_on, **demo.companions}, seed=p.seed) if demo.companions else {}
        for m in p.select_methods:
            pos, neg = evals[m, b, 1][0], evals[m, b, -1][0]
            c, kl_neg = coeffs[m, b]
            line = {"stage": "selectivity", "round": -1, "method": m, "kl_budget": b, "coeff": c, "kl_p95_neg": kl_neg,
                    **strict[m],
                    "trait_move_pos": demo.trait_move(pos[trait], base[trait]),
                    "trait_move_neg": demo.trait_move(neg[trait], base[trait]),
                    "coh_pos": pos["coherence"] / base["coherence"], "coh_neg": neg["coherence"] / base["coherence"]}
            for f, s in demo.companions.items():  # the companion's own move, signed toward its direction
                line[f"{f}_move"] = float(s * deltas[m][:, FOUNDATIONS.index(f)].mean())
            if loose:
                line.update(sel_companions=loose[m]["selectivity"], sel_companions_lo=loose[m]["selectivity_lo"],
                            sel_companions_hi=loose[m]["selectivity_hi"])
            append_metrics(run_dir, line)
            out.append(line)
    return out
