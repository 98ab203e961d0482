"""The loop's journal entry and plots, built from the run folder alone (so a crashed or resumed
run, or someone else's copy of the folder, gives the same entry)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from shl import plots, probe
from shl.demos import load_demo
from shl.journal import REPO, completed_rounds, md_cell, md_table, read_jsonl, read_metrics, write_entry
from shl.loop import STAGES, headline
from shl.mfv import READS_MIN_JS, READS_MIN_RANK, reads_warning
from shl.params import load_params
from shl.selectivity import round_selectivity

PLOTS = ("trajectory", "pareto", "plane", "filter_rounds")


def make_plots(run_dir: Path, lines: list[dict], p, demo) -> list[str]:
    """Write the loop's plots as PNG into the run folder; returns the names written."""
    trait = demo.trait_foundation
    figs = {"trajectory": plots.plot_trajectory(lines, trait, p.coh_floor),
            "pareto": plots.plot_pareto(lines, trait, demo.trait_sign),
            "plane": plots.plot_plane(lines),
            "filter_rounds": plots.plot_filter_rounds(lines, p.gen_pass_target)}
    for name, fig in figs.items():
        plots.save(fig, run_dir, name)
        plt.close(fig)
    return list(figs)


def dropped_sample(run_dir: Path, k: int, coeff: float) -> dict | None:
    """A raw steered completion of round k that the filter dropped, the first at the dose nearest
    `coeff` (the settled dose the round trained on)."""
    dropped = [r for r in read_jsonl(run_dir / f"generated_r{k}.jsonl") if not r["kept"]]
    return min(dropped, key=lambda r: abs(r["coeff"] - coeff)) if dropped else None


def day_night(run_dir: Path, rounds: list[dict]) -> str:
    """Per round: a dropped raw steered sample (night) and the healed model's greedy answer to the
    first demo prompt (day); the base model's answer first."""
    base = read_jsonl(run_dir / "demos_base.jsonl")
    prompt = base[0]["prompt"] if base else ""
    rows = [{"round": "base", "dropped steered sample": "", "greedy answer": md_cell(base[0]["text"], 220) if base else ""}]
    for r in rounds:
        k = r["round"]
        d = dropped_sample(run_dir, k, r["coeff"])
        demo = read_jsonl(run_dir / f"demos_r{k}.jsonl")
        rows.append({"round": str(k),
                     "dropped steered sample": (f"({', '.join(d['reasons'])}, coeff {d['coeff']:.2f}) {md_cell(d['completion'], 220)}"
                                                if d else "(none dropped)"),
                     "greedy answer": md_cell(demo[0]["text"], 220) if demo else ""})
    return f"First demo prompt: _{prompt}_\n\n" + md_table(rows, ["round", "dropped steered sample", "greedy answer"])


ROUND_COLS = ["round", "kappa", "coeff", "kept", "generated", "steered_d_trait", "healed_d_trait",
              "healed_d_trait_beyond_null",
              "steered_coherence", "healed_coherence", "healed_coh_ratio", "heal_train_nll", "heal_heldout_nll",
              "heal_final_D", "cos_v_v0", "cos_student_teacher", "seconds"]


SEL_COLS = ["round", "steered_on", "steered_off", "steered_selectivity", "healed_on", "healed_off",
            "healed_selectivity", "healed_sel_lo", "healed_sel_hi"]


def timing_table(lines: list[dict], rounds: list[dict]) -> str:
    once = sum(r.get("seconds", 0.0) for r in lines if r.get("stage") in ("base", "prompt_baseline"))
    rows = [dict({"round": r["round"]}, **{s: r.get(f"seconds_{s}", 0.0) for s in STAGES}, total=r["seconds"])
            for r in rounds]
    if not rounds:
        return f"Base + prompting-baseline evals: {once:.0f} s; no round finished yet."
    totals = {s: sum(r[s] for r in rows) for s in STAGES}
    rows.append(dict({"round": "all"}, **totals, total=sum(totals.values())))
    top = max(STAGES, key=lambda s: totals[s])
    note = (f"Base + prompting-baseline evals: {once:.0f} s. Rounds: {rows[-1]['total']:.0f} s. "
            f"Dominant stage: **{top}** ({totals[top] / rows[-1]['total']:.0%} of the rounds' time). "
            "Model loading and plotting are not counted.")
    return md_table(rows, ["round", *STAGES, "total"], digits=0) + "\n\n" + note


def headline_text(head: dict) -> str:
    """The headline paragraph and the list of every verdict that applies."""
    text = (f"**Headline (round {head['round']} healed vs base):** Δtrait {head['d_trait']:+.3f} nats raw"
            + (f", {head['d_trait_beyond_null']:+.3f} beyond the null arm (which moved {head['null_d_trait']:+.3f})"
               if head["d_trait_beyond_null"] == head["d_trait_beyond_null"] else " (no null arm)")
            + f", Δcoherence {head['d_coh']:+.3f} ({head['coherence']:.3f} vs {head['base_coherence']:.3f}, "
            f"{head['coh_ratio']:.2f}x), cost {head['cost']:.3f} coherence per nat; the healed model keeps "
            f"{head['keeps']:.0%} of the steered move. Largest off-target move: {head['off_target']} "
            f"{head['off_target_move']:.3f} nats raw"
            + (f", {head['off_target_beyond_null']} {head['off_target_beyond_null_move']:.3f} beyond the null"
               if head["off_target_beyond_null"] else "")
            + f". Prompting baseline: Δtrait {head['baseline_d_trait']:+.3f} at coherence "
            f"{head['baseline_coherence']:.3f}."
            + (f" On centred log-probs against base (see `shl.selectivity`): healed on {head['healed_on']:+.3f}, "
               f"off {head['healed_off']:.3f}, selectivity {head['healed_selectivity']:+.3f} "
               f"[{head['healed_sel_lo']:+.3f}, {head['healed_sel_hi']:+.3f}]; the steered model it learned from: on "
               f"{head['steered_on']:+.3f}, off {head['steered_off']:.3f}, selectivity "
               f"{head['steered_selectivity']:+.3f}." if "healed_on" in head else "")
            + (f" Trait probe (held-out dilemmas, conflict items' principled-minus-deferring gap against base, "
               f"`shl.probe`): healed {head['probe_d']:+.3f} nats, steered {head['probe_steered_d']:+.3f}"
               + (f", null arm {head['probe_null_d']:+.3f}, beyond the null {head['probe_d_beyond_null']:+.3f}"
                  if head["probe_null_d"] == head["probe_null_d"] else "") + "."
               if head.get("probe_d", math.nan) == head.get("probe_d", math.nan) else "")
            + (f"\n\n**Instrument:** {head['instrument_warning']}." if head.get("instrument_warning") else "")
            + f"\n\n**Verdict: {head['verdict']}**")
    if head["verdicts"]:
        text += "\n\n" + "\n".join(f"- {w}" for w in head["why"].split("; "))
    else:
        text += f" ({head['why']})."
    return text


INSTRUMENT_COLS = ["stage", "round", "protocol", "top1_acc", "top1_const", "read_js", "rank_human_dev", "n_argmax",
                   "coherence", "trait_probe_gap", "trait_probe_auc"]
EVAL_STAGES = ("base", "prompt_baseline", "null", "steered", "healed")


def instrument_section(lines: list[dict]) -> str:
    """Does each eval read the vignettes, and what the trait probe says: one row per eval line."""
    rows = [r for r in lines if r.get("stage") in EVAL_STAGES and "read_js" in r]
    if not rows:
        return ""
    base = next((r for r in rows if r["stage"] == "base"), None)
    warning = reads_warning(base) if base else ""
    return ("### Instrument\n\n"
            + (f"**{warning}.**\n\n" if warning else "")
            + f"read_js: mean JS divergence (nats) of a row's answer from the eval's mean answer; rank_human_dev: mean "
              f"per-row Spearman of the answer's deviation from the mean vs the humans' (a constant answer scores 0 on "
              f"both; the warning fires under {READS_MIN_JS} or {READS_MIN_RANK}); top1_const: the best constant "
              "answer's top-1. trait_probe_gap: the held-out dilemmas' principled-minus-deferring gap (conflict items, "
              "nats); trait_probe_auc: how well it separates the known-answer controls (`shl.probe`).\n\n"
            + md_table(rows, INSTRUMENT_COLS))


PROBE_STAGES = ("prompt_baseline", "null", "steered", "healed")


def probe_section(run_dir: Path, lines: list[dict]) -> str:
    """The trait probe's moves against base, per kind of item, paired over the items, with a
    standard error: the conflict items are the trait's question, the controls say whether a move
    is judgement or a blanket push for or against the instruction."""
    base_path = Path(run_dir) / "evals" / "base_r-1_probe.jsonl"
    if not base_path.exists():
        return ""
    base_rows, rows = read_jsonl(base_path), []
    for r in lines:
        path = Path(run_dir) / "evals" / f"{r.get('stage')}_r{r.get('round')}_probe.jsonl"
        if r.get("stage") in PROBE_STAGES and path.exists():
            m = probe.paired_moves(base_rows, read_jsonl(path))
            rows.append({"stage": r["stage"], "round": r["round"],
                         **{k: f"{m[k][0]:+.2f} ± {m[k][1]:.2f}" for k in probe.KINDS},
                         "conflict items up": f"{m['conflict'][2]:.0%}"})
    if not rows:
        return ""
    return ("### Trait probe\n\nEach column is the change of the principled-minus-deferring gap against base, in nats, "
            "mean ± standard error over the same items (`shl.probe`). Conflict items are the trait's question. "
            "defer_right items are harmless instructions, and defer_wrong items are plainly wrong ones. A "
            "judgement would raise the gap on defer_wrong and lower it on defer_right; a blanket push against "
            "instructions would raise all three.\n\n"
            + md_table(rows, ["stage", "round", *probe.KINDS, "conflict items up"]))


def _shown(path: Path) -> str:
    """The path relative to the repo when it lies inside (how a reader of the journal types it)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def report(run_dir: Path, error: str = "") -> Path:
    """Plots and entry.md for a 04 run folder, from its files. `error`: why the run stopped early."""
    run_dir = Path(run_dir)
    p = load_params(str(run_dir / "params.yaml"))
    demo = load_demo(p)
    lines = read_metrics(run_dir)
    rounds = completed_rounds(lines)
    trait = f"{demo.trait_foundation}_nats"
    make_plots(run_dir, lines, p, demo)
    head = headline(lines, demo.trait_foundation, demo.trait_sign, p.coh_floor)
    sel_rows = [dict(round=r["round"], **round_selectivity(run_dir, demo.trait_foundation, demo.trait_sign,
                                                           r["round"], p.seed)) for r in rounds]
    if head:  # new keys beside the raw nats (the headline's round may not be finished: a crashed run)
        head.update(round_selectivity(run_dir, demo.trait_foundation, demo.trait_sign, head["round"], p.seed))
    base = next((r for r in lines if r["stage"] == "base"), None)
    baseline = next((r for r in lines if r["stage"] == "prompt_baseline"), None)

    if error:
        status = (f"**Interrupted** after {len(rounds)} finished round(s): `{md_cell(error, 300)}`. Re-run with the "
                  "same `run_dir` and parameters to resume after the last finished round.")
    elif rounds and rounds[-1]["stopped"]:
        status = f"**Stopped** after round {rounds[-1]['round']}: {rounds[-1]['stop_reason']}."
    elif len(rounds) < p.rounds:
        status = f"In progress: {len(rounds)} of {p.rounds} rounds finished."
    else:
        status = f"Finished: {len(rounds)} rounds."
    parts = [
        f"Model `{p.model}`, demo `{demo.name}` (trait: {demo.trait_foundation}_nats "
        f"{'down' if demo.trait_sign < 0 else 'up'}), {len(rounds)} of {p.rounds} rounds. "
        f"Heal: reg `{p.reg}`, kl_agg `{p.kl_agg}`, barrier_ref `{p.barrier_ref}`, lam {p.lam} "
        f"(round pow {p.lam_round_pow}), tau {p.tau}, spectral_lam {p.spectral_lam}, lr {p.lr}, {p.epochs} epochs; "
        f"walk-C: steer_coeff {p.steer_coeff}, pass target {p.gen_pass_target}, n_keep {p.n_keep}. "
        f"Everything else: `params.yaml` (re-create with `python -m shl.run notebooks/04_loop.ipynb "
        f"--params {_shown(run_dir)}/params.yaml`; adapters are not in git).",
        status,
    ]
    if head:
        parts.append(headline_text(head))
    null = next((r for r in lines if r["stage"] == "null"), None)
    if base and baseline:
        once = [("base", base), ("prompt_baseline", baseline)] + ([("null arm", null)] if null else [])
        parts.append(md_table(
            [{"stage": s, trait: r[trait], "care_nats": r["care_nats"], "coherence": r["coherence"],
              "d_trait": demo.trait_move(r[trait], base[trait]) + 0.0} for s, r in once],
            ["stage", trait, "care_nats", "coherence", "d_trait"])
            + ("\n\nThe null arm is the same heal on unsteered completions of round 0's prompts (same count, "
               "filter and settings): what fine-tuning alone moves. Trait claims are read beyond it." if null else ""))
    if rounds:
        parts += ["### Rounds\n\nd_trait is signed toward the trait, in nats against base; coherence ratio against "
                  "base; cos_v_v0 = the re-extracted vector vs round 0's; cos_student_teacher = what the round's "
                  "adapter moved (adapter on vs off, neutral prompt) vs the vector it learned from.\n\n"
                  + md_table(rounds, ROUND_COLS),
                  "### Selectivity per round\n\nOn centred log-probs (each answer's log-prob minus the mean over the "
                  "seven), each model against base: on = the trait's mean move toward the trait, off = the mean |move| "
                  "of the other six foundations (care included), selectivity = on − 0.1 off, with a 95% row bootstrap "
                  "interval.\n\n" + md_table(sel_rows, SEL_COLS)]
    parts += [x for x in (instrument_section(lines), probe_section(run_dir, lines)) if x]
    parts += ["### Plots\n\n" + "\n".join(f"![{n}]({n}.png)" for n in PLOTS),
              "### Day and night\n\n" + day_night(run_dir, rounds),
              "### Wall time (s)\n\n" + timing_table(lines, rounds)]
    return write_entry(run_dir, f"04_loop: {demo.name} on {p.model}", "\n\n".join(parts))
