"""Matplotlib figures the notebooks show inline and save as PNG into the run folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from shl.params import FOUNDATIONS


def save(fig, run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_profiles(profiles: dict[str, dict], title: str = "MFV profile"):
    """Grouped bars: p per foundation for each named profile (e.g. model vs human)."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(profiles)
    x = np.arange(len(FOUNDATIONS))
    for i, (name, prof) in enumerate(profiles.items()):
        ax.bar(x + (i - (len(profiles) - 1) / 2) * width, [prof[f] for f in FOUNDATIONS], width, label=name)
    ax.set_xticks(x, FOUNDATIONS)
    ax.set_ylabel("mean p")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_sweep(sweep: list[dict], base: dict, baseline: dict, trait: str, coh_frac: float = 0.9):
    """Trait nats and coherence vs steering coefficient, base and prompting baseline as references."""
    sweep = sorted(sweep, key=lambda r: r["coeff"])
    c = [r["coeff"] for r in sweep]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for ax, key, label in ((ax1, f"{trait}_nats", f"{trait}_nats"), (ax2, "coherence", "coherence (pmass)")):
        ax.plot(c, [r[key] for r in sweep], "o-", label="steered")
        ax.axhline(base[key], color="k", ls="--", lw=1, label="base")
        ax.axhline(baseline[key], color="tab:orange", ls=":", lw=1.5, label="prompting baseline")
        ax.set_ylabel(label)
    if trait != "care":
        ax1.plot(c, [r["care_nats"] for r in sweep], "s-", alpha=0.5, label="care_nats (steered)")
    ax2.axhline(coh_frac * base["coherence"], color="r", lw=0.8, alpha=0.6, label=f"{coh_frac} x base")
    ax2.set_xlabel("steering coefficient (multiple of the raw vector)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_filter(records: list[dict], ppl_tau: float):
    """Tail perplexity vs dose, kept vs dropped, with the threshold; survival per dose on the right."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for kept, color, label in ((True, "tab:green", "kept"), (False, "tab:red", "dropped")):
        pts = [(r["coeff"], min(r["tail_ppl"], 1e6)) for r in records if r["kept"] == kept]
        if pts:
            ax.scatter(*zip(*pts), s=14, alpha=0.6, color=color, label=label)
    ax.axhline(ppl_tau, color="k", ls="--", lw=1, label=f"filter_ppl_tau {ppl_tau:g}")
    ax.set_yscale("log")
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel("tail perplexity (reference model)")
    doses = sorted({r["coeff"] for r in records})
    surv = [sum(r["kept"] for r in records if r["coeff"] == d) / sum(r["coeff"] == d for r in records) for d in doses]
    ax2 = ax.twinx()
    ax2.plot(doses, surv, "o-", color="tab:blue", label="survival")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("survival", color="tab:blue")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_walk(trace: list[dict], target: float):
    """walk-C: kappa and survival per batch."""
    fig, ax = plt.subplots(figsize=(7, 3))
    x = range(len(trace))
    ax.plot(x, [t["kappa"] for t in trace], "o-", label="kappa")
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("kappa")
    ax2 = ax.twinx()
    ax2.bar(x, [t["kept"] / max(t["generated"], 1) for t in trace], alpha=0.3, color="tab:green", label="survival")
    ax2.axhline(target, color="tab:green", ls="--", lw=1)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("survival")
    fig.tight_layout()
    return fig


def plot_heal(steps: list[dict], tau: float, title: str = "heal"):
    """NLL and the barrier's D per optimizer step, tau drawn; barrier pressure below."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True)
    x = [s["step"] for s in steps]
    ax1.plot(x, [s["nll"] for s in steps], label="nll (completion tokens)")
    ax1.plot(x, [s["D"] for s in steps], label="D (aggregated KL)")
    ax1.axhline(tau, color="r", ls="--", lw=1, label=f"tau {tau:g}")
    ax1.set_title(title)
    ax1.legend(fontsize=8)
    measured = [(s["step"], s["pressure"]) for s in steps if s["pressure"] == s["pressure"]]  # nan: not split
    if measured:
        ax2.plot(*zip(*measured), "o-", ms=3, color="tab:purple")
    ax2.set_ylabel("|grad barrier| / |grad nll|\n(steps that split it)")
    ax2.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


# --- the loop (04) ------------------------------------------------------------------------------

def _stage(lines: list[dict], stage: str) -> list[dict]:
    return sorted((r for r in lines if r.get("stage") == stage), key=lambda r: r["round"])


def _once(lines: list[dict], stage: str) -> dict | None:
    return next((r for r in lines if r.get("stage") == stage), None)


def plot_trajectory(lines: list[dict], trait: str, coh_floor: float):
    """The trait's nats per stage over rounds (base and prompting baseline as lines), coherence below."""
    base, baseline = _once(lines, "base"), _once(lines, "prompt_baseline")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for ax, key in ((ax1, f"{trait}_nats"), (ax2, "coherence")):
        for stage, style in (("steered", "o--"), ("healed", "s-")):
            pts = _stage(lines, stage)
            if pts:
                ax.plot([r["round"] for r in pts], [r[key] for r in pts], style, label=stage)
        if base:
            ax.axhline(base[key], color="k", ls="--", lw=1, label="base")
        if baseline:
            ax.axhline(baseline[key], color="tab:green", ls=":", lw=1.5, label="prompting baseline")
        null = _once(lines, "null")
        if null:
            ax.axhline(null[key], color="tab:gray", ls="-.", lw=1.2, label="null arm (heal on unsteered text)")
    if base:
        ax2.axhline(coh_floor * base["coherence"], color="r", lw=0.8, alpha=0.6, label=f"coh_floor {coh_floor} x base")
    ax1.set_ylabel(f"{trait}_nats")
    ax2.set_ylabel("coherence (pmass)")
    ax2.set_xlabel("round")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pareto(lines: list[dict], trait: str, sign: int):
    """Left: Δtrait (toward the trait) vs Δcoherence against base, for every steered and healed
    point, the prompting baseline and the null arm; up-right of the origin is trait for free,
    down-right is paid for. With a null arm, each healed point also appears beyond it (hollow,
    Δtrait minus the null's). Right: Δtrait vs the largest off-target move (raw filled, beyond the
    null hollow); above the diagonal the shift is broad rather than the trait."""
    from shl.params import FOUNDATIONS
    base = _once(lines, "base")
    fig, (ax, ax_off) = plt.subplots(1, 2, figsize=(11, 4.5))
    if base is None:
        return fig
    key = f"{trait}_nats"
    null = _once(lines, "null")

    def d(r, f=trait):
        return r[f"{f}_nats"] - base[f"{f}_nats"]

    def xy(r):
        return sign * d(r), r["coherence"] - base["coherence"]

    for stage, marker in (("steered", "o"), ("healed", "s")):
        pts = _stage(lines, stage)
        if pts:
            x, y = zip(*map(xy, pts))
            ax.scatter(x, y, marker=marker, label=stage, zorder=3)
            for r, xi, yi in zip(pts, x, y):
                ax.annotate(f"r{r['round']}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    healed = _stage(lines, "healed")
    if null and healed:
        n = sign * d(null)
        ax.scatter(*xy(null), marker="P", s=80, color="tab:gray", label="null arm", zorder=3)
        for r in healed:
            x, y = xy(r)
            ax.plot([x, x - n], [y, y], color="tab:gray", lw=0.8, zorder=2)
            ax.scatter([x - n], [y], marker="s", facecolors="none", edgecolors="tab:blue",
                       zorder=3, label="healed beyond null" if r is healed[0] else None)
    baseline = _once(lines, "prompt_baseline")
    if baseline:
        ax.scatter(*xy(baseline), marker="*", s=120, color="tab:orange", label="prompting baseline", zorder=3)
    ax.scatter([0], [0], marker="x", color="k", label="base", zorder=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel(f"Δtrait (nats toward the trait; {trait}_nats x {sign:+d})")
    ax.set_ylabel("Δcoherence")
    ax.legend(fontsize=8)

    others = [f for f in FOUNDATIONS if f != trait]
    for r in healed:
        t = sign * d(r)
        ax_off.scatter([t], [max(abs(d(r, f)) for f in others)], marker="s", color="tab:blue", zorder=3,
                       label="healed, raw" if r is healed[0] else None)
        ax_off.annotate(f"r{r['round']}", (t, max(abs(d(r, f)) for f in others)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if null:
            tb = t - sign * d(null)
            ob = max(abs(d(r, f) - d(null, f)) for f in others)
            ax_off.scatter([tb], [ob], marker="s", facecolors="none", edgecolors="tab:blue", zorder=3,
                           label="healed, beyond null" if r is healed[0] else None)
    lim = max([abs(x) for x in ax_off.get_xlim()] + list(ax_off.get_ylim()) + [0.1])
    ax_off.plot([0, lim], [0, lim], "k--", lw=0.8, label="broad above this line")
    ax_off.set_xlabel("Δtrait (nats toward the trait)")
    ax_off.set_ylabel("largest off-target |Δnats|")
    ax_off.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_plane(lines: list[dict]):
    """The run on the Care vs Authority plane: base, then steered and healed per round, arrows in order."""
    nodes = []
    for name in ("base",):
        r = _once(lines, name)
        if r:
            nodes.append(("base", r))
    rounds = sorted({r["round"] for r in lines if r.get("stage") in ("steered", "healed")})
    for k in rounds:
        for stage in ("steered", "healed"):
            r = next((x for x in lines if x.get("stage") == stage and x["round"] == k), None)
            if r:
                nodes.append((f"{stage[0]}{k}", r))
    fig, ax = plt.subplots(figsize=(6, 5))
    colors = {"b": "k", "s": "tab:red", "h": "tab:blue"}
    for (label, r), (_, nxt) in zip(nodes, nodes[1:]):
        ax.annotate("", (nxt["care_nats"], nxt["authority_nats"]), (r["care_nats"], r["authority_nats"]),
                    arrowprops=dict(arrowstyle="->", color="gray", lw=1))
    baked = [r for label, r in nodes if label[0] in "bh"]  # base -> h0 -> h1 ...: what the weights hold
    ax.plot([r["care_nats"] for r in baked], [r["authority_nats"] for r in baked], "-", color="tab:blue", lw=2,
            alpha=0.5, label="baked path (base, healed)")
    for label, r in nodes:
        ax.scatter(r["care_nats"], r["authority_nats"], color=colors[label[0]], zorder=3)
        ax.annotate(label, (r["care_nats"], r["authority_nats"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    baseline = _once(lines, "prompt_baseline")
    if baseline:
        ax.scatter(baseline["care_nats"], baseline["authority_nats"], marker="*", s=120, color="tab:orange",
                   label="prompting baseline", zorder=3)
    null = _once(lines, "null")
    if null:
        ax.scatter(null["care_nats"], null["authority_nats"], marker="P", s=80, color="tab:gray",
                   label="null arm (heal on unsteered text)", zorder=3)
    ax.legend(fontsize=8)
    ax.set_xlabel("care_nats")
    ax.set_ylabel("authority_nats")
    ax.set_title("Care vs Authority (b = base, s = steered, h = healed; k = round)")
    fig.tight_layout()
    return fig


def plot_filter_rounds(lines: list[dict], target: float):
    """Per round: filter survival over all walk-C batches (bars) and the settled kappa (line)."""
    rounds = _stage(lines, "round")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = [r["round"] for r in rounds]
    ax.bar(x, [r["survival"] for r in rounds], alpha=0.4, color="tab:green", label="survival (all batches)")
    ax.axhline(target, color="tab:green", ls="--", lw=1, label=f"gen_pass_target {target:g}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("survival")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax2 = ax.twinx()
    ax2.plot(x, [r["kappa"] for r in rounds], "o-", color="tab:purple", label="settled kappa")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("kappa", color="tab:purple")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


# --- sweeps -------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (more x and more y), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def plot_sweep_pareto(marks: list[tuple[str, float, float, str]], title: str = "sweep"):
    """One marker per sweep point: Δtrait (x) vs coherence / base coherence (y), the point's label
    beside it, marker by verdict, the frontier (no other point has both more trait and more
    coherence) drawn through its points."""
    fig, ax = plt.subplots(figsize=(7, 5))
    shapes = {"pass": "o", "broad": "D", "undo": "s", "broken": "x"}
    for verdict in dict.fromkeys(str(m[3]) for m in marks):
        pts = [m for m in marks if str(m[3]) == verdict]
        ax.scatter([m[1] for m in pts], [m[2] for m in pts], marker=shapes.get(verdict, "^"), label=verdict, zorder=3)
    for label, x, y, _ in marks:
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front([(m[1], m[2]) for m in marks])
    ax.plot([marks[i][1] for i in front], [marks[i][2] for i in front], "-", color="grey", lw=1.2, zorder=2,
            label="frontier")
    ax.axvline(0, color="k", lw=0.5)
    ax.axhline(1, color="k", lw=0.5)
    ax.set_xlabel("Δtrait (nats toward the trait, last healed model vs base)")
    ax.set_ylabel("coherence / base coherence")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- 01: steering methods at matched doses --------------------------------------------------------

def plot_selectivity(lines: list[dict], baseline_move: float | None = None, baseline_coh: float | None = None):
    """`selectivity` lines of 01 (one per method and KL budget). Left: selectivity with its 95%
    interval per method, one marker per budget. Right: the methods on the trait-vs-coherence
    plane, +coeff (filled) and -coeff (open) joined, base at (0, 1)."""
    methods = list(dict.fromkeys(r["method"] for r in lines))
    budgets = sorted({r["kl_budget"] for r in lines})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.6 / max(len(budgets), 1)
    for j, b in enumerate(budgets):
        for i, m in enumerate(methods):
            r = next((x for x in lines if x["method"] == m and x["kl_budget"] == b), None)
            if r is None:
                continue
            x = i + (j - (len(budgets) - 1) / 2) * width
            ax1.errorbar(x, r["selectivity"], [[r["selectivity"] - r["selectivity_lo"]], [r["selectivity_hi"] - r["selectivity"]]],
                         fmt="os^Dv"[j % 5], color=colors[m], capsize=3)
            xs = [r["trait_move_neg"], r["trait_move_pos"]]
            ys = [r["coh_neg"], r["coh_pos"]]
            ax2.plot(xs, ys, "-", color=colors[m], alpha=0.4)
            ax2.scatter(xs[1], ys[1], marker="os^Dv"[j % 5], color=colors[m], zorder=3,
                        label=f"{m}, KL {b:g}")
            ax2.scatter(xs[0], ys[0], marker="os^Dv"[j % 5], facecolors="none", edgecolors=colors[m], zorder=3)
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_xticks(range(len(methods)), methods)
    ax1.set_ylabel("selectivity (half of -coeff -> +coeff, centred log-probs)")
    ax1.set_title("selectivity = on - 0.1 off, 95% row bootstrap")
    ax1.legend([Line2D([], [], marker="os^Dv"[j % 5], color="grey", ls="") for j in range(len(budgets))],
               [f"p95 KL {b:g}" for b in budgets], fontsize=8)
    ax2.scatter([0], [1], marker="x", color="k", label="base", zorder=3)
    if baseline_move is not None:
        ax2.scatter([baseline_move], [baseline_coh], marker="*", s=120, color="tab:orange", label="prompting baseline", zorder=3)
    ax2.axvline(0, color="k", lw=0.5)
    ax2.axhline(1, color="k", lw=0.5)
    ax2.set_xlabel("trait move vs base (nats toward the trait)")
    ax2.set_ylabel("coherence / base coherence")
    ax2.set_title("filled: +coeff, open: -coeff")
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig
