"""The loop (04): rounds of steer -> walk-C generate + filter -> heal, resumable from the run folder.

Round k, with the history (adapters r0..r{k-1}) active:
  re-extract v_k from the current student -> walk-C at dose steer_coeff * kappa -> eval steered ->
  heal adapter r{k} -> save it -> eval healed -> greedy demos -> the `round` metrics line -> stop
  when healed coherence < coh_floor x base coherence.

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

from shl import demos, filter as filt, heal, plots, steer
from shl.generate import generate_texts
from shl.journal import (append_metrics, completed_rounds, log_eval, read_jsonl, read_metrics, saved_history,
                         write_jsonl)
from shl.mfv import eval_kwargs, evaluate
from shl.models import chat_prompt
from shl.params import FOUNDATIONS, Params

ONCE = ("base", "prompt_baseline")  # eval stages of round -1
# what round k leaves besides its metrics lines ({k} filled in); discarded when the round is redone
ROUND_FILES = ("vector_r{k}.pt", "generated_r{k}.jsonl", "walk_c_r{k}.jsonl", "heal_log_r{k}.jsonl",
               "demos_r{k}.jsonl", "heal_r{k}.png", "evals/steered_r{k}.jsonl", "evals/healed_r{k}.jsonl")
STAGES = ("extract", "generate_filter", "eval_steered", "heal", "eval_healed", "demos", "student")


def below_floor(coherence: float, base_coherence: float, coh_floor: float) -> bool:
    """The loop's stop rule and the `broken` verdict: coherence under coh_floor x base."""
    return coherence < coh_floor * base_coherence


def round_seed(p: Params, k: int) -> int:
    """Seed of round k's sampling; walk-C adds its batch index (< gen_max_batches) to it."""
    return p.seed + 100_003 * (k + 1)


# --- the headline and verdict -----------------------------------------------------------------

def headline(lines: list[dict], trait_foundation: str, trait_sign: int, coh_floor: float) -> dict | None:
    """The run's headline from its metrics lines: the last healed model against base.

    d_trait is signed toward the trait (positive = the trait grew), d_coh = coherence change,
    cost = |d_coh| / |d_trait|. verdict, first that applies:
      broken: healed coherence < coh_floor x base coherence;
      undo:   the healed model keeps less than half the move of the steered model it learned from
              (or moves against the trait);
      broad:  another foundation moved at least as many nats as the trait;
      pass.
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
    d_trait = trait_sign * (last[key] - base[key])
    d_steer = trait_sign * (steered[key] - base[key]) if steered else math.nan
    d_coh = last["coherence"] - base["coherence"]
    others = {f: abs(last[f"{f}_nats"] - base[f"{f}_nats"]) for f in FOUNDATIONS if f != trait_foundation}
    off, off_move = max(others.items(), key=lambda kv: kv[1])
    if below_floor(last["coherence"], base["coherence"], coh_floor):
        verdict, why = "broken", f"coherence {last['coherence']:.3f} < {coh_floor} x base {base['coherence']:.3f}"
    elif d_trait <= 0 or (steered is not None and d_trait < 0.5 * d_steer):
        verdict, why = "undo", f"healed moved {d_trait:+.3f} nats of the steered {d_steer:+.3f}"
    elif off_move >= abs(d_trait):
        verdict, why = "broad", f"{off} moved {off_move:.3f} nats, the trait {abs(d_trait):.3f}"
    else:
        verdict, why = "pass", f"healed keeps {d_trait / d_steer:.0%} of the steered move" if steered else "trait moved"
    return {"round": k, "trait": trait_foundation, "d_trait": d_trait, "d_coh": d_coh,
            "cost": abs(d_coh) / abs(d_trait) if d_trait else math.inf, "steered_d_trait": d_steer,
            "coherence": last["coherence"], "base_coherence": base["coherence"],
            "off_target": off, "off_target_move": off_move, "verdict": verdict, "why": why}


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
        model = heal.load_adapters(model, paths)
        print(f"resuming {run_dir.name} after round {len(done) - 1}: adapters {history} loaded")
    stopped = bool(done and done[-1].get("stopped"))
    return model, history, len(done), stopped


# --- once per run -----------------------------------------------------------------------------

def once_per_run(model, tok, p: Params, run_dir: Path, demo: demos.Demo, progress: bool = True) -> tuple[dict, dict]:
    """Base eval, prompting-baseline eval (pos persona as the system prompt) and base demo
    generations, each done only if the folder lacks it. Returns (base line, baseline line)."""
    run_dir = Path(run_dir)
    lines = {r["stage"]: r for r in read_metrics(run_dir) if r.get("stage") in ONCE}
    with heal.adapters(model, []):  # the base model, whatever history is loaded
        for stage, system in (("base", None), ("prompt_baseline", demo.pos)):
            if stage not in lines:
                res = evaluate(model, tok, system=system, progress=progress, **eval_kwargs(p))
                lines[stage] = log_eval(run_dir, res, stage)
        if not (run_dir / "demos_base.jsonl").exists():
            write_jsonl(run_dir / "demos_base.jsonl", demo_rows(model, tok, p, demo, "base", -1))
    return lines["base"], lines["prompt_baseline"]


def demo_rows(model, tok, p: Params, demo: demos.Demo, stage: str, k: int) -> list[dict]:
    """Greedy answers to the fixed demo prompts: read down the rounds, they show the loop, not noise."""
    texts = generate_texts(model, tok, [chat_prompt(tok, x) for x in demo.demo_prompts], p.demo_max_new_tokens,
                           batch_size=p.gen_batch_size, progress=False)
    return [{"stage": stage, "round": k, "prompt": x, "text": t} for x, t in zip(demo.demo_prompts, texts)]


# --- the round --------------------------------------------------------------------------------

def round_student_vector(model, tok, contexts: list[str], layers: list[int], before: list[str], after: list[str],
                         batch_size: int, progress: bool) -> steer.Vector:
    """What this round's adapter moved: the history + r{k} (after) vs the history (before)."""
    return steer.student_vector(model, tok, contexts, layers, batch_size=batch_size, progress=progress,
                                student=lambda: heal.adapters(model, after),
                                reference=lambda: heal.adapters(model, before))


def run_round(model, tok, p: Params, run_dir: Path, demo: demos.Demo, k: int, history: list[str], base: dict,
              progress: bool = True) -> tuple[object, dict]:
    """Round k on top of `history` (active). Returns (model with r{k} added, the `round` line)."""
    run_dir = Path(run_dir)
    trait = f"{demo.trait_foundation}_nats"
    seconds, t = {}, time.time()

    def lap(stage):
        nonlocal t
        seconds[f"seconds_{stage}"] = time.time() - t
        t = time.time()

    heal.set_active(model, history)
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
    heal.save_adapter(model, name, run_dir / "adapters" / name)
    fig = plots.plot_heal(log["steps"], p.tau, f"heal r{k} ({p.reg}, {p.kl_agg}, lam_eff {heal.lam_eff(p, k):.3g}, tau {p.tau})")
    plots.save(fig, run_dir, f"heal_r{k}")
    plt.close(fig)
    lap("heal")

    healed = log_eval(run_dir, evaluate(model, tok, progress=progress, **eval_kwargs(p)), "healed", k)
    lap("eval_healed")
    write_jsonl(run_dir / f"demos_r{k}.jsonl", demo_rows(model, tok, p, demo, "healed", k))
    lap("demos")
    student = round_student_vector(model, tok, contexts, layers, history, history + [name],
                                   p.extract_batch_size, progress)
    lap("student")

    stop = below_floor(healed["coherence"], base["coherence"], p.coh_floor)
    line = {
        "stage": "round", "round": k, "trait": demo.trait_foundation,
        "kappa": kappa, "coeff": coeff, "generated": len(records), "kept": len(kept),
        "survival": len(kept) / max(len(records), 1),
        "steered_trait_nats": steered[trait], "healed_trait_nats": healed[trait],
        "steered_d_trait": demo.trait_move(steered[trait], base[trait]),
        "healed_d_trait": demo.trait_move(healed[trait], base[trait]),
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
        for k in range(start, p.rounds if not stopped else start):
            t0 = time.time()
            model, line = run_round(model, tok, p, run_dir, demo, k, history, base, progress)
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
