"""The loop (04): rounds of steer -> walk-C generate + filter -> heal, resumable from the run folder.

Round k, with the history (adapters r0..r{k-1}) active:
  re-extract v_k from the current student -> walk-C at dose steer_coeff * kappa -> eval steered ->
  heal adapter r{k} -> save it -> eval healed -> (round 0 only: the null control arm, `shl.null`)
  -> greedy demos -> the `round` metrics line -> stop when healed coherence < coh_floor x base
  coherence.

Everything a round leaves is in the run folder; a `round` line is written last, so a folder
whose metrics end without one holds a half-written round, which `resume` discards and redoes.
Every stage that samples is seeded from (seed, round), so a resumed round equals an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import matplotlib.pyplot as plt
from peft.tuners.lora import LoraLayer

from shl import demos, filter as filt, heal, null, plots, steer
from shl.generate import generate_texts
from shl.history import adapters, load_adapters, save_adapter, set_active
from shl.journal import (append_metrics, completed_rounds, log_eval, read_jsonl, read_metrics, saved_history,
                         write_jsonl)
from shl.mfv import eval_kwargs, evaluate, reads_warning
from shl.models import chat_prompt
from shl.params import FOUNDATIONS, Params

ONCE = ("base", "prompt_baseline")  # eval stages of round -1
# what round k leaves besides its metrics lines ({k} filled in); discarded when the round is redone
ROUND_FILES = ("vector_r{k}.pt", "generated_r{k}.jsonl", "walk_c_r{k}.jsonl", "heal_log_r{k}.jsonl",
               "demos_r{k}.jsonl", "heal_r{k}.png", "evals/steered_r{k}.jsonl", "evals/healed_r{k}.jsonl",
               "evals/steered_r{k}_probe.jsonl", "evals/healed_r{k}_probe.jsonl")
# the null control arm runs inside round 0: its files go with round 0's
NULL_FILES = ("generated_null.jsonl", "heal_log_null.jsonl", "evals/null_r0.jsonl", "evals/null_r0_probe.jsonl",
              "adapters/null")
STAGES = ("extract", "generate_filter", "eval_steered", "heal", "eval_healed", "null", "demos", "student")


def below_floor(coherence: float, base_coherence: float, coh_floor: float) -> bool:
    """The loop's stop rule and the `broken` verdict: coherence under coh_floor x base."""
    return coherence < coh_floor * base_coherence


def round_seed(p: Params, k: int) -> int:
    """Seed of round k's sampling; walk-C adds its batch index (< gen_max_batches) to it."""
    return p.seed + 100_003 * (k + 1)


# --- the headline and verdict -----------------------------------------------------------------

VERDICTS = ("broken", "undo", "broad")  # in the order the primary label is picked


def headline(lines: list[dict], trait_foundation: str, trait_sign: int, coh_floor: float) -> dict | None:
    """The run's headline from its metrics lines: the last healed model against base, raw and
    beyond the null control arm (the `null` eval: the same heal on unsteered completions).

    d_trait is signed toward the trait (positive = the trait grew), d_coh = coherence change,
    cost = |d_coh| / |d_trait|; `null_d_trait` is the null arm's trait move and
    `d_trait_beyond_null` = d_trait - null_d_trait. Off-target moves: `off_target_move` is the
    largest raw |nats change| of another foundation, `off_target_beyond_null_move` the largest
    |healed - null| (what the heal moved beyond fine-tuning drift). `verdicts` lists every
    failure that applies, `verdict` is the first of them (or pass):
      broken: healed coherence < coh_floor x base coherence;
      undo:   the healed model keeps less than half the move of the steered model it learned from
              (or moves against the trait);
      broad:  another foundation moved at least as many nats as the trait, beyond the null when
              the run has one (raw moves otherwise; `broad_basis` says which).
    Beside them, not part of the verdict: `probe_d` (and `probe_steered_d`, `probe_null_d`,
    `probe_d_beyond_null`), the trait probe's conflict gap against base, and
    `instrument_warning`, the base eval's "barely reads the vignettes" line ('' if it reads them).
    None when the lines hold no base and healed eval (e.g. a 01 or 02 run)."""
    base = next((r for r in lines if r.get("stage") == "base"), None)
    healed = [r for r in lines if r.get("stage") == "healed"]
    finished = {r["round"] for r in completed_rounds(lines)}
    if finished:  # a loop run: a healed line of a round that never finished is not a result
        healed = [r for r in healed if r["round"] in finished]
    if base is None or not healed:
        return None
    last = max(healed, key=lambda r: r["round"])
    k, key = last["round"], f"{trait_foundation}_nats"
    steered = next((r for r in lines if r.get("stage") == "steered" and r["round"] == k), None)
    null = next((r for r in lines if r.get("stage") == "null"), None)
    baseline = next((r for r in lines if r.get("stage") == "prompt_baseline"), None)
    others = [f for f in FOUNDATIONS if f != trait_foundation]

    def move(r, f=trait_foundation):  # nats change of foundation f against base
        return r[f"{f}_nats"] - base[f"{f}_nats"]

    d_trait = trait_sign * move(last)
    d_steer = trait_sign * move(steered) if steered else math.nan
    d_coh = last["coherence"] - base["coherence"]
    raw_off = {f: abs(move(last, f)) for f in others}
    off, off_move = max(raw_off.items(), key=lambda kv: kv[1])
    out = {"round": k, "trait": trait_foundation, "d_trait": d_trait, "d_coh": d_coh,
           "cost": abs(d_coh) / abs(d_trait) if d_trait else math.inf, "steered_d_trait": d_steer,
           "keeps": d_trait / d_steer if steered and d_steer else math.nan,
           "coherence": last["coherence"], "base_coherence": base["coherence"],
           "coh_ratio": last["coherence"] / base["coherence"],
           "off_target": off, "off_target_move": off_move,
           "baseline_d_trait": trait_sign * move(baseline) if baseline else math.nan,
           "baseline_coherence": baseline["coherence"] if baseline else math.nan}
    if null is not None:
        beyond = {f: abs(move(last, f) - move(null, f)) for f in others}
        off_b, off_b_move = max(beyond.items(), key=lambda kv: kv[1])
        out.update(null_d_trait=trait_sign * move(null), d_trait_beyond_null=d_trait - trait_sign * move(null),
                   null_coherence=null["coherence"], off_target_beyond_null=off_b,
                   off_target_beyond_null_move=off_b_move, broad_basis="beyond null")
        trait_for_broad, off_for_broad, off_name = out["d_trait_beyond_null"], off_b_move, off_b
    else:
        out.update(null_d_trait=math.nan, d_trait_beyond_null=math.nan, null_coherence=math.nan,
                   off_target_beyond_null="", off_target_beyond_null_move=math.nan, broad_basis="raw (no null arm)")
        trait_for_broad, off_for_broad, off_name = d_trait, off_move, off

    # the trait probe (shl.probe) beside the vignettes: the conflict items' gap, + = the trait's side
    probe = {"probe_d": last, "probe_steered_d": steered, "probe_null_d": null}
    out.update({k: (r["trait_probe_gap"] - base["trait_probe_gap"]) if r and "trait_probe_gap" in r and
                "trait_probe_gap" in base else math.nan for k, r in probe.items()})
    out["probe_d_beyond_null"] = out["probe_d"] - out["probe_null_d"]
    out["instrument_warning"] = reads_warning(base)  # '' when the base model reads the vignettes

    why = {}
    if below_floor(last["coherence"], base["coherence"], coh_floor):
        why["broken"] = f"coherence {last['coherence']:.3f} < {coh_floor} x base {base['coherence']:.3f}"
    if d_trait <= 0 or (steered is not None and d_trait < 0.5 * d_steer):
        why["undo"] = f"healed moved {d_trait:+.3f} nats of the steered {d_steer:+.3f}"
    if off_for_broad >= abs(trait_for_broad):
        why["broad"] = (f"{off_name} moved {off_for_broad:.3f} nats {out['broad_basis']}, the trait "
                        f"{abs(trait_for_broad):.3f}")
    out["verdicts"] = [v for v in VERDICTS if v in why]
    out["verdict"] = out["verdicts"][0] if why else "pass"
    out["why"] = "; ".join(f"{v}: {why[v]}" for v in out["verdicts"]) or (
        f"healed keeps {d_trait / d_steer:.0%} of the steered move" if steered else "trait moved")
    return out


# --- resume -----------------------------------------------------------------------------------

def discard_partial(run_dir: Path, next_round: int) -> list[str]:
    """Drop every metrics line and file of rounds >= next_round (a half-written round).
    Returns what was discarded, for the log."""
    run_dir = Path(run_dir)
    gone = []
    # save_adapter writes into adapters/.r{k}-*/ first: a kill mid-save leaves that behind
    for tmp in sorted((run_dir / "adapters").glob(".r*-*")) if (run_dir / "adapters").is_dir() else []:
        shutil.rmtree(tmp)
        gone.append(str(tmp.relative_to(run_dir)))
    lines = read_metrics(run_dir)
    keep = [r for r in lines if r.get("round", -1) < next_round]
    if len(keep) < len(lines):
        gone.append(f"{len(lines) - len(keep)} metrics lines")
        write_jsonl(run_dir / "metrics.jsonl", keep)
    k = next_round
    while True:  # a crash leaves files of one round at most, but clean any that are there
        paths = [run_dir / f.format(k=k) for f in ROUND_FILES] + [run_dir / "adapters" / f"r{k}"]
        paths += [run_dir / f for f in NULL_FILES] if k == 0 else []
        present = [q for q in paths if q.exists()]
        if not present:
            break
        for q in present:
            shutil.rmtree(q) if q.is_dir() else q.unlink()
            gone.append(str(q.relative_to(run_dir)))
        k += 1
    return gone


def resume(model, p: Params, run_dir: Path) -> tuple[object, list[str], int, bool]:
    """Load the adapters of the completed rounds as frozen history and discard a half-written round.

    Returns (model, history adapter names, next round, stopped: the loop hit coh_floor already)."""
    run_dir = Path(run_dir)
    if model is not None and any(isinstance(m, LoraLayer) for m in model.modules()):
        # e.g. the same notebook kernel after a crash: heal wraps the model in place, so it may
        # carry an adapter that was never saved, and every later stage would run on top of it
        raise RuntimeError("the model already carries LoRA adapters; resume loads the saved ones itself: "
                           "load the model again (shl.load_model) and re-run")
    done = completed_rounds(read_metrics(run_dir))
    paths = saved_history(run_dir)
    history = list(paths)
    gone = discard_partial(run_dir, len(done))
    if gone:
        print(f"discarded a half-written round {len(done)}: {', '.join(gone)}")
    if history:
        model = load_adapters(model, paths)
        print(f"resuming {run_dir.name} after round {len(done) - 1}: adapters {history} loaded")
    stopped = bool(done and done[-1].get("stopped"))
    return model, history, len(done), stopped


# --- once per run -----------------------------------------------------------------------------

def once_per_run(model, tok, p: Params, run_dir: Path, demo: demos.Demo, progress: bool = True) -> tuple[dict, dict]:
    """Base eval, prompting-baseline eval (pos persona as the system prompt) and base demo
    generations, each done only if the folder lacks it. Returns (base line, baseline line)."""
    run_dir = Path(run_dir)
    lines = {r["stage"]: r for r in read_metrics(run_dir) if r.get("stage") in ONCE}
    with adapters(model, []):  # the base model, whatever history is loaded
        for stage, system in (("base", None), ("prompt_baseline", demo.pos)):
            if stage not in lines:
                res = evaluate(model, tok, system=system, progress=progress, **eval_kwargs(p))
                lines[stage] = log_eval(run_dir, res, stage)
        if not (run_dir / "demos_base.jsonl").exists():
            write_jsonl(run_dir / "demos_base.jsonl", demo_rows(model, tok, p, demo, "base", -1))
    if reads_warning(lines["base"]):
        print(reads_warning(lines["base"]), flush=True)
    return lines["base"], lines["prompt_baseline"]


def demo_rows(model, tok, p: Params, demo: demos.Demo, stage: str, k: int) -> list[dict]:
    """Greedy answers to the fixed demo prompts: read down the rounds, they show the loop, not noise."""
    texts = generate_texts(model, tok, [chat_prompt(tok, x) for x in demo.demo_prompts], p.demo_max_new_tokens,
                           batch_size=p.gen_batch_size, progress=False)
    return [{"stage": stage, "round": k, "prompt": x, "text": t} for x, t in zip(demo.demo_prompts, texts)]


# --- the round --------------------------------------------------------------------------------

def round_student_vector(model, tok, contexts: list[str], layers: list[int], before: list[str], after: list[str],
                         batch_size: int, progress: bool, states: dict | None = None) -> steer.Vector:
    """What this round's adapter moved: the history + r{k} (after) vs the history (before), under a
    neutral prompt. `states` keeps each adapter stack's hidden states across rounds: round k's
    `after` is round k+1's `before` (the same model, the same prompts), so it is read once."""
    states = {} if states is None else states
    prompts = [chat_prompt(tok, x) for x in contexts]
    for names in (before, after):
        if tuple(names) not in states:
            with adapters(model, names):
                states[tuple(names)] = steer.last_token_states(model, tok, prompts, layers, batch_size, progress,
                                                               f"student {'+'.join(names) or 'base'}")
    return steer.student_vector(states[tuple(after)], states[tuple(before)])


def run_round(model, tok, p: Params, run_dir: Path, demo: demos.Demo, k: int, history: list[str], base: dict,
              progress: bool = True, states: dict | None = None) -> tuple[object, dict]:
    """Round k on top of `history` (active). Returns (model with r{k} added, the `round` line).
    `states`: the student vector's hidden states by adapter stack, carried from round to round."""
    run_dir = Path(run_dir)
    trait = f"{demo.trait_foundation}_nats"
    seconds, t = {}, time.time()

    def lap(stage):
        nonlocal t
        seconds[f"seconds_{stage}"] = time.time() - t
        t = time.time()

    set_active(model, history)
    contexts = demos.load_contexts(p)
    layers = steer.band_layers(steer.num_layers(model), p.steer_band)
    vec = steer.extract(model, tok, demo.pos, demo.neg, contexts, layers, p.extract_batch_size, progress, p.steer_method)
    vec.meta["round"] = k
    vec.save(run_dir / f"vector_r{k}.pt")
    v0 = vec if k == 0 else steer.Vector.load(run_dir / "vector_r0.pt")
    lap("extract")

    kept, kappa, trace, records = filt.generate_and_filter(
        model, tok, vec, demo, p, seed=round_seed(p, k), progress=progress,
        on_starve=lambda tr: write_jsonl(run_dir / f"walk_c_r{k}.jsonl", tr))
    write_jsonl(run_dir / f"generated_r{k}.jsonl", records)
    write_jsonl(run_dir / f"walk_c_r{k}.jsonl", trace)
    for b in sorted({r["batch"] for r in records}):
        append_metrics(run_dir, dict(filt.filter_line([r for r in records if r["batch"] == b], "walk_c"),
                                     round=k, batch=b))
    coeff = p.steer_coeff * kappa
    lap("generate_filter")

    with steer.steer(model, vec, coeff):
        steered = log_eval(run_dir, evaluate(model, tok, progress=progress, **eval_kwargs(p)), "steered", k,
                           coeff=coeff, kappa=kappa)
    lap("eval_steered")

    model, log = heal.heal(model, tok, kept, p, round_idx=k, history=history, progress=progress)
    name = f"r{k}"
    write_jsonl(run_dir / f"heal_log_r{k}.jsonl", log["steps"])
    heal_line = heal.summary_line(log, p, k)
    append_metrics(run_dir, heal_line)
    save_adapter(model, name, run_dir / "adapters" / name)
    fig = plots.plot_heal(log["steps"], p.tau, f"heal r{k} ({p.reg}, {p.kl_agg}, lam_eff {heal.lam_eff(p, k):.3g}, tau {p.tau})")
    plots.save(fig, run_dir, f"heal_r{k}")
    plt.close(fig)
    lap("heal")

    healed = log_eval(run_dir, evaluate(model, tok, progress=progress, **eval_kwargs(p)), "healed", k)
    lap("eval_healed")
    if k == 0 and p.null_arm:  # once per run, on round 0's prompts and count
        model, _ = null.run_null_arm(model, tok, kept, p, run_dir, 0, demo, progress)
        lap("null")
    null_line = next((r for r in read_metrics(run_dir) if r.get("stage") == null.NULL), None)
    null_move = demo.trait_move(null_line[trait], base[trait]) if null_line else math.nan
    write_jsonl(run_dir / f"demos_r{k}.jsonl", demo_rows(model, tok, p, demo, "healed", k))
    lap("demos")
    student = round_student_vector(model, tok, contexts, layers, history, history + [name],
                                   p.extract_batch_size, progress, states)
    lap("student")

    stop = below_floor(healed["coherence"], base["coherence"], p.coh_floor)
    line = {
        "stage": "round", "round": k, "trait": demo.trait_foundation,
        "kappa": kappa, "coeff": coeff, "generated": len(records), "kept": len(kept),
        "survival": len(kept) / max(len(records), 1),
        "steered_trait_nats": steered[trait], "healed_trait_nats": healed[trait],
        "steered_d_trait": demo.trait_move(steered[trait], base[trait]),
        "healed_d_trait": demo.trait_move(healed[trait], base[trait]),
        "null_d_trait": null_move, "healed_d_trait_beyond_null": demo.trait_move(healed[trait], base[trait]) - null_move,
        "steered_coherence": steered["coherence"], "healed_coherence": healed["coherence"],
        "healed_coh_ratio": healed["coherence"] / base["coherence"],
        "heal_train_nll": heal_line["train_nll"], "heal_heldout_nll": heal_line["heldout_nll"],
        "heal_final_D": heal_line["final_D"],
        "cos_v_v0": steer.cosine(vec, v0)[1], "cos_student_teacher": steer.cosine(student, vec)[1],
        **seconds, "seconds": sum(seconds.values()), "stopped": stop,
        "stop_reason": (f"healed coherence {healed['coherence']:.3f} < coh_floor {p.coh_floor} x base "
                        f"{base['coherence']:.3f}") if stop else "",
    }
    append_metrics(run_dir, line)  # last: its presence marks the round complete
    return model, line


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One loop per run folder: a second one would discard the first one's round as half-written.
    A lock left by a dead process (a kill -9, a lost machine) is taken over."""
    path = Path(run_dir) / ".lock"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                pass  # alive, another user's
            raise RuntimeError(f"{run_dir} is in use by process {pid} (a loop is running there); "
                               f"wait for it or use another run_dir (remove {path} if that process is not a loop)")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def run_loop(model, tok, p: Params, run_dir: Path, progress: bool = True, report=None):
    """Resume, the once-per-run evals, then rounds until `rounds` or the coherence floor.

    `report(run_dir)` (plots + entry.md) runs after the once-per-run stage, after every round and
    when a round raises, so a crashed run still has its entry. Returns (model, round lines)."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _run_loop(model, tok, p, run_dir, progress, report or (lambda d, **kw: None))


def _run_loop(model, tok, p: Params, run_dir: Path, progress: bool, report):
    demo = demos.load_demo(p)
    model, history, start, stopped = resume(model, p, run_dir)
    try:
        base, _ = once_per_run(model, tok, p, run_dir, demo, progress)
        report(run_dir)
        if stopped:
            print(f"the loop stopped at round {start - 1} (coherence floor); nothing to run")
        states = {}  # the student vector's hidden states by adapter stack (round k's after = k+1's before)
        for k in range(start, p.rounds if not stopped else start):
            t0 = time.time()
            model, line = run_round(model, tok, p, run_dir, demo, k, history, base, progress, states)
            history.append(f"r{k}")
            print(f"round {k}: kappa {line['kappa']:.3f}, kept {line['kept']}/{line['generated']}, "
                  f"trait {line['steered_d_trait']:+.3f} steered -> {line['healed_d_trait']:+.3f} healed nats, "
                  f"coherence {line['healed_coherence']:.3f} ({line['healed_coh_ratio']:.2f}x base), "
                  f"{time.time() - t0:.0f} s")
            report(run_dir)
            if line["stopped"]:
                print(f"stopping after round {k}: {line['stop_reason']}")
                break
    except BaseException as e:
        try:
            report(run_dir, error=f"{type(e).__name__}: {e}")
        except Exception as report_error:  # never let the report hide why the run stopped
            print(f"writing the entry after the crash failed too: {report_error!r}")
        raise
    return model, completed_rounds(read_metrics(run_dir))
