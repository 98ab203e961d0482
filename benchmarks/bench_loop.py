"""Benchmark the loop stage by stage: this tree against an earlier commit, in one run.

    .venv/bin/python benchmarks/bench_loop.py [--before f88da64] [--rounds 1] [-p NAME VALUE ...]
                                              [--profile] [--out benchmarks/results/bench_loop.md]

For each tree (the commit `--before`, checked out into a temporary git worktree, then this one),
a fresh subprocess loads the embedded model and runs the once-per-run evals and `--rounds` rounds
of `shl.loop` on the default preset into a temporary run folder, one tree after the other (never
both at once: two torch processes on a small CPU thrash). The `round` lines' `seconds_<stage>`
give each stage's time; the table prints both trees' seconds and their ratio, plus the model
load and the once-per-run evals. `--profile` also runs this tree's round under torch.profiler
and adds its top operators to the report. Nothing gates on these numbers: they are measured on a
shared machine, and the ratio between two trees measured back to back is what to read.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ("extract", "generate_filter", "eval_steered", "heal", "eval_healed", "null", "demos", "student")


def driver(args):
    """Runs inside the subprocess, with the tree under test first on sys.path."""
    t0 = time.time()
    import torch

    from shl import demos, loop
    from shl.models import load_model
    from shl.params import load_params

    overrides = {k: yaml.safe_load(v) for k, v in args.p}
    p = load_params("default", rounds=args.rounds, **overrides)
    model, tok = load_model(p.model, p.dtype, p.device, p.seed)
    t_load = time.time() - t0
    run_dir = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    demo = demos.load_demo(p)
    t = time.time()
    base, _ = loop.once_per_run(model, tok, p, run_dir, demo, progress=False)
    t_once = time.time() - t
    history, lines = [], []
    prof = None
    for k in range(p.rounds):
        if args.profile and k == 0:
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
        try:
            model, line = loop.run_round(model, tok, p, run_dir, demo, k, history, base, progress=False)
        finally:
            if prof is not None and k == 0:
                prof.__exit__(None, None, None)
        history.append(f"r{k}")
        lines.append(line)
    out = {"load": t_load, "once": t_once, "rounds": lines, "threads": torch.get_num_threads()}
    if prof is not None:
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print("BENCH_JSON " + json.dumps(out, default=float), flush=True)


def run_tree(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", "--rounds", str(args.rounds)]
    cmd += [x for kv in args.p for x in ("-p", *kv)] + (["--profile"] if args.profile and tree == REPO else [])
    t = time.time()
    res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"the round failed in {tree}:\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("BENCH_JSON "))
    out = json.loads(line[len("BENCH_JSON "):])
    out["wall"] = time.time() - t
    return out


def table(before: dict, after: dict, ref: str) -> str:
    rows = [("model load", before["load"], after["load"]), ("base + baseline evals", before["once"], after["once"])]
    for k, (rb, ra) in enumerate(zip(before["rounds"], after["rounds"])):
        # the null arm runs in round 0 only
        rows += [(f"r{k} {s}", rb[f"seconds_{s}"], ra[f"seconds_{s}"]) for s in STAGES
                 if f"seconds_{s}" in ra and f"seconds_{s}" in rb]
        rows.append((f"r{k} round total", rb["seconds"], ra["seconds"]))
    rows.append(("subprocess wall", before["wall"], after["wall"]))
    out = [f"| stage | {ref} (s) | this tree (s) | ratio |", "|---|---|---|---|"]
    out += [f"| {name} | {b:.1f} | {a:.1f} | {b / a:.2f}x |" for name, b, a in rows]
    return "\n".join(out)


def same_science(before: dict, after: dict) -> str:
    """The figures that must not move with speed: kept counts, kappa, the evals."""
    keys = ("kappa", "generated", "kept", "steered_trait_nats", "healed_trait_nats", "steered_coherence",
            "healed_coherence", "heal_train_nll", "cos_student_teacher")
    out = ["| round | key | before | after |", "|---|---|---|---|"]
    for k, (rb, ra) in enumerate(zip(before["rounds"], after["rounds"])):
        out += [f"| {k} | {key} | {rb[key]:.5g} | {ra[key]:.5g} |" for key in keys]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="f88da64", help="the commit to compare against (default: before issue 11)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a params override")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over this tree's round 0")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_loop.md"))
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        return driver(args)

    with tempfile.TemporaryDirectory(prefix="bench_before_") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old), args.before], check=True)
        try:
            print(f"running {args.rounds} round(s) at {args.before} ...", flush=True)
            before = run_tree(old, args)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=True)
    print("running this tree ...", flush=True)
    after = run_tree(REPO, args)
    report = [f"# bench_loop: {args.rounds} round(s), default preset, {after['threads']} torch threads",
              f"Overrides: {args.p or 'none'}. Before = `{args.before}`; after = this tree.\n",
              table(before, after, args.before), "\n## The same science?\n", same_science(before, after)]
    if "profile" in after:
        report += ["\n## torch.profiler, this tree, round 0 (top operators by self CPU time)\n",
                   "```\n" + after["profile"] + "\n```"]
    text = "\n".join(report) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
