"""The default loop's floor on this machine: the least time its work can take here.

    .venv/bin/python benchmarks/bench_floor.py [--run-dir journal/<a default 04_loop run>] [--wall SECONDS]
                                               [--out benchmarks/results/bench_floor.md]

1. Counts the floating-point work of every stage of round 0 (null arm and the once-per-run evals
   included) with torch's FLOP formulas (`FlopCount`): matmuls and attention, forward and
   backward, on the default preset, the way `shl.loop` runs them.
2. Measures this machine's best bfloat16 matmul rate with the loop's threads at the loop's shapes:
   the many-row ones of the heal, the evals, the filter and extraction, and the 16-row decode
   step of generation; and the sampler's cost per decode step (transformers' temperature and
   top-p warpers, softmax and multinomial over the vocabulary), which the draws of a seed fix.
3. Scales round 0's work per unit (a generated row, a judged row, an eval, a heal step, ...) to
   the units of a whole default run, read from `--run-dir`'s metrics (default: the newest default
   04_loop folder under journal/), and prints each stage's floor beside its measured seconds.

floor = work / best rate (+ the sampler's per-step cost for generation): no run of this work at
these shapes can take less on this machine without computing something else. The count takes
matmuls and attention only (elementwise work, the LM head's softmax, Python: none), so the
floor is a lower bound. Its figures are measurements of one machine: nothing gates on them.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the loop's functions whose work is counted, by stage (the innermost one running takes the FLOPs)
STAGES = {"eval": ("shl.loop", "evaluate"), "heal": ("shl.heal", "heal"), "generate": ("shl.filter", "steered_batch"),
          "filter": ("shl.filter", "tail_ppl"), "extract": ("shl.steer", "extract"),
          "student": ("shl.loop", "round_student_vector"), "demos": ("shl.loop", "demo_rows")}
# the null arm reaches evaluate through its own module
ALIASES = {"eval": [("shl.null", "evaluate")]}


def best_rate(shapes, dtype, reps=5, n=20) -> float:
    """The highest FLOP/s of F.linear over `shapes` ([M, K, N]), best of `reps` timings of n calls."""
    import torch
    best = 0.0
    for M, K, N in shapes:
        a, w = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype)
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(n):
                torch.nn.functional.linear(a, w)
            best = max(best, 2 * M * K * N * n / (time.perf_counter() - t))
    return best


def sampler_seconds(model, tok, p, reps=20) -> float:
    """Seconds of one decode step's sampling on a full batch: the warpers `generate` applies
    (temperature, top-p), softmax, multinomial; on real last-position logits, best of `reps`."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from shl.demos import load_demo
    from shl.models import chat_prompt, input_device, left_pad
    prompts = [tok(chat_prompt(tok, u), add_special_tokens=False).input_ids
               for u in load_demo(p).prompt_pool[:p.gen_batch_size]]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids.to(input_device(model)), attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
    warpers = [TemperatureLogitsWarper(p.gen_temperature), TopPLogitsWarper(p.gen_top_p)]
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        scores = logits.clone()
        for w in warpers:
            scores = w(ids, scores)
        torch.multinomial(scores.softmax(-1), num_samples=1)
        best = min(best, time.perf_counter() - t)
    return best


def unit_count(stage: str, args, out) -> int:
    """How many units one call of a stage's function did: rows for generation (steered_batch's
    records) and the filter (tail_ppl's prompts), optimizer steps for a heal, none for the student
    (its unit is an adapter stack read, counted where `last_token_states` runs), else one call."""
    if stage == "generate":
        return len(out)
    if stage == "filter":
        return len(args[2])
    if stage == "heal":
        return len(out[1]["steps"])
    return 0 if stage == "student" else 1


class FlopCount:
    """Counts the FLOPs of matmuls and attention as they dispatch (forward and backward), with
    torch's own formulas (torch.utils.flop_counter). torch's FlopCounterMode also tracks the module
    tree with hooks on every tensor, which held a round's graphs alive here until the machine ran out
    of memory; this keeps one running total. The CPU flash-attention ops, which torch's table lacks,
    take the sdpa formulas."""

    def __init__(self):
        import torch
        from torch.utils import flop_counter as fc
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        table = dict(fc.flop_registry)
        table[aten._scaled_dot_product_flash_attention_for_cpu] = fc.shape_wrapper(
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = fc.shape_wrapper(
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = table.get(func._overloadpacket)
                if formula is not None:
                    counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.total, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def count_round0(p):
    """FLOPs and units of each stage over the once-per-run evals and round 0 (null arm included)."""
    import importlib

    import torch

    from shl import demos, loop
    from shl.models import load_model

    model, tok = load_model(p.model, p.dtype, p.device, p.seed)
    flops, units, stack = Counter(), Counter(), []
    counter = FlopCount()

    def wrap(stage, mod_name, fn_name):
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)

        def counted(*a, **k):
            start = counter.total
            stack.append([stage, 0])  # [stage, FLOPs of stages nested inside it]
            try:
                out = fn(*a, **k)
            finally:
                _, inner = stack.pop()
                total = counter.total - start
                flops[stage] += total - inner
                if stack:
                    stack[-1][1] += total
            units[stage] += unit_count(stage, a, out)
            return out
        setattr(mod, fn_name, counted)

    for stage, (mod_name, fn_name) in STAGES.items():
        for m, f in [(mod_name, fn_name), *ALIASES.get(stage, [])]:
            wrap(stage, m, f)
    steer = importlib.import_module("shl.steer")
    read = steer.last_token_states

    def stack_read(*a, **k):  # the student stage reads one adapter stack per call (round 0: two)
        units["student"] += bool(stack) and stack[-1][0] == "student"
        return read(*a, **k)
    steer.last_token_states = stack_read
    run_dir = Path(tempfile.mkdtemp(prefix="bench_floor_"))
    demo = demos.load_demo(p)
    with counter:
        base, _ = loop.once_per_run(model, tok, p, run_dir, demo, progress=False)
        loop.run_round(model, tok, p, run_dir, demo, 0, [], base, progress=False)
    return model, tok, flops, units, torch.get_num_threads()


def run_units(run_dir: Path, p) -> tuple[Counter, dict, int]:
    """Units of a whole default run, its measured seconds per stage, and its rounds, from its metrics."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [r for r in lines if r["stage"] == "round"]
    evals = [r for r in lines if r["stage"] in ("base", "prompt_baseline", "steered", "healed", "null")]
    gen = [r for r in lines if r["stage"] == "filter" and r.get("phase") in ("walk_c", "null")]
    heals = [r for r in lines if r["stage"] in ("heal", "null_heal")]
    null = next(r for r in lines if r["stage"] == "null")
    null_heal = next(r for r in lines if r["stage"] == "null_heal")
    rows = sum(r["generated"] for r in gen)
    units = Counter(eval=len(evals), heal=sum(r["steps"] for r in heals), generate=rows, filter=rows,
                    extract=len(rounds), student=len(rounds) + 1, demos=len(rounds) + 1)
    # decode steps of full batches: walk-C's lines are one batch each; the null arm's attempts in batches
    units["decode_steps"] = sum(math.ceil(r["generated"] / p.gen_batch_size) for r in gen) * p.gen_max_new_tokens
    r0 = next(r for r in rounds if r["round"] == 0)
    seconds = {"eval": sum(r["seconds"] for r in evals), "heal": sum(r["seconds"] for r in heals),
               "generate + filter": sum(r["seconds_generate_filter"] for r in rounds)
               + r0["seconds_null"] - null_heal["seconds"] - null["seconds"],
               "extract": sum(r["seconds_extract"] for r in rounds), "student": sum(r["seconds_student"] for r in rounds),
               "demos": sum(r["seconds_demos"] for r in rounds)}
    return units, seconds, len(rounds)


def newest_default_loop(journal: Path) -> Path:
    import yaml

    from shl.params import load_params
    default = load_params("default").to_dict()
    for d in sorted(journal.glob("*_04_loop_*"), reverse=True):
        if (d / "metrics.jsonl").exists() and (d / "params.yaml").exists():
            params = yaml.safe_load((d / "params.yaml").read_text())
            if all(params.get(k) == v for k, v in default.items() if k not in ("slug",)):
                if any(json.loads(x)["stage"] == "round" for x in (d / "metrics.jsonl").read_text().splitlines() if x):
                    return d
    raise SystemExit("no default 04_loop run folder under journal/: pass --run-dir")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="", help="a finished default 04_loop run folder (its units and seconds)")
    ap.add_argument("--wall", type=float, default=0.0,
                    help="the whole command's measured seconds for that run (setup included), to set beside the floor")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_floor.md"))
    args = ap.parse_args()

    import torch

    from shl.params import load_params
    p = load_params("default")
    run_dir = Path(args.run_dir) if args.run_dir else newest_default_loop(REPO / "journal")
    units, seconds, n_rounds = run_units(run_dir, p)

    t0 = time.time()
    model, tok, flops, units0, threads = count_round0(load_params("default", rounds=1))
    count_s = time.time() - t0
    dtype = model.dtype
    H, V, F = model.config.hidden_size, model.config.vocab_size, model.config.intermediate_size
    # a heal micro-batch's rows (4 completions of ~141 tokens) and its completion positions at the head
    wide = best_rate([(564, H, F), (564, F, H), (564, H, H), (324, H, V)], dtype)
    decode = best_rate([(p.gen_batch_size, H, F), (p.gen_batch_size, F, H), (p.gen_batch_size, H, H),
                        (p.gen_batch_size, H, V)], dtype)
    sample = sampler_seconds(model, tok, p)

    per_unit = {s: flops[s] / units0[s] for s in flops if units0[s]}
    floor = {}
    for s in ("heal", "eval", "generate", "filter", "extract", "student", "demos"):
        rate = decode if s in ("generate", "demos") else wide
        floor[s] = per_unit.get(s, 0.0) * units[s] / rate
    floor["generate"] += units["decode_steps"] * sample
    rows = [("heal", units["heal"], "steps", flops["heal"] / units0["heal"], floor["heal"], seconds["heal"]),
            ("eval", units["eval"], "evals", per_unit["eval"], floor["eval"], seconds["eval"]),
            ("generate + filter", units["generate"], "rows", (flops["generate"] + flops["filter"]) / units0["generate"],
             floor["generate"] + floor["filter"], seconds["generate + filter"]),
            ("extract", units["extract"], "calls", per_unit["extract"], floor["extract"], seconds["extract"]),
            ("student", units["student"], "stacks", per_unit["student"], floor["student"], seconds["student"]),
            ("demos", units["demos"], "calls", per_unit["demos"], floor["demos"], seconds["demos"])]
    total_floor, total_meas = sum(r[4] for r in rows), sum(r[5] for r in rows)
    table = ["| stage | units in the run | GFLOP per unit | floor (s) | measured (s) | measured / floor |",
             "|---|---|---|---|---|---|"]
    table += [f"| {name} | {u} {what} | {g / 1e9:.1f} | {f:.0f} | {m:.0f} | {m / f:.2f}x |"
              for name, u, what, g, f, m in rows]
    table.append(f"| all stages | | | {total_floor:.0f} | {total_meas:.0f} | {total_meas / total_floor:.2f}x |")
    report = [
        f"# bench_floor: the default {n_rounds}-round loop's floor on this machine ({threads} torch threads, {dtype})",
        f"Units and measured seconds: `{run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir}`. "
        f"Work per unit: round 0 of the default preset counted as it dispatched ({count_s:.0f} s).\n",
        f"- best {dtype} matmul rate, many-row shapes (heal, evals, filter, extraction): {wide / 1e9:.0f} GFLOP/s",
        f"- best rate at the {p.gen_batch_size}-row decode step: {decode / 1e9:.0f} GFLOP/s",
        f"- the sampler per decode step (temperature, top-p over {V} tokens, softmax, multinomial; "
        f"{p.gen_batch_size} rows): {sample * 1e3:.1f} ms, {units['decode_steps']} steps in the run\n",
        "\n".join(table),
        "\nThe stages' floor leaves out setup, the kernel's start, the model load, the plots and the "
        "notebook's other cells; the measured seconds are the stages' own (metrics.jsonl).",
    ]
    if args.wall:
        rest = args.wall - total_meas
        report.append(f"\nThe whole command took {args.wall:.0f} s: the stages {total_meas:.0f} s, everything else "
                      f"{rest:.0f} s. With that rest as it is and every stage at its floor: {total_floor + rest:.0f} s "
                      f"({(total_floor + rest) / 60:.1f} min).")
    text = "\n".join(report) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
