"""Matplotlib figures the notebooks show inline and save as PNG into the run folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

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
    ax2.plot(x, [s["pressure"] for s in steps], color="tab:purple")
    ax2.set_ylabel("|grad barrier| / |grad nll|")
    ax2.set_xlabel("optimizer step")
    fig.tight_layout()
    return fig
