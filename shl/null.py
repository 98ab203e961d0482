"""The null control arm: the same heal on unsteered completions, to read trait moves against.

LoRA training on almost any text moves the eval: on the embedded model a LoRA trained on fluent,
barely steered completions moved care +0.52, loyalty +0.35 and authority +0.08 nats. So a trait
claim is read beyond this arm: the same prompts as the steered data it is compared with, the same
filter, the same count, the same heal settings (seed, schedule, barrier), steering off. Its eval
is the `null` stage; the headline subtracts its moves (`shl.loop.headline`).
"""

from __future__ import annotations

import time
from pathlib import Path

from shl import filter as filt
from shl import heal
from shl.generate import Starved, survival_table
from shl.history import adapters, drop_adapter, save_adapter, set_active
from shl.journal import append_metrics, log_eval, write_jsonl
from shl.mfv import eval_kwargs, evaluate

NULL = "null"  # the arm's adapter name and eval stage


def unsteered_data(model, tok, prompts: list[str], p, seed: int, narration=(), progress: bool = True):
    """One kept unsteered completion per prompt (steering and adapters off), judged by the same
    filter; a prompt whose completion is dropped is sampled again with the next seed, at most
    `gen_max_batches` times. Returns (kept in prompt order, every judged record)."""
    kept: dict[int, dict] = {}
    records, trace = [], []
    with adapters(model, []):
        for attempt in range(p.gen_max_batches):
            todo = [i for i in range(len(prompts)) if i not in kept]
            if not todo:
                break
            recs = filt.steered_batch(model, tok, None, 0.0, [prompts[i] for i in todo], p, seed + attempt,
                                      progress=progress, kappa=0.0, batch=attempt)
            filt.judge(model, tok, recs, p, narration)
            for i, r in zip(todo, recs):
                r["attempt"] = attempt
                if r["kept"]:
                    kept[i] = r
            records += recs
            trace.append({"phase": "null", "kappa": 0.0, "generated": len(recs), "kept": sum(r["kept"] for r in recs)})
    if len(kept) < len(prompts):
        raise Starved(f"the null arm kept {len(kept)} of {len(prompts)} unsteered completions after "
                      f"{p.gen_max_batches} attempts: the filter drops unsteered text (loosen it)\n{survival_table(trace)}")
    return [kept[i] for i in range(len(prompts))], records


def run_null_arm(model, tok, steered_kept: list[dict], p, run_dir: Path, round_idx: int, demo,
                 progress: bool = True):
    """Heal adapter `null` on unsteered completions of the prompts of `steered_kept` exactly as
    round 0 heals r0 (history none), evaluate it alone as the `null` stage (round `round_idx`),
    save it under adapters/null and take it off the model again. Returns (model, null eval line).

    Leaves generated_null.jsonl, heal_log_null.jsonl, a `filter` line (phase null), a
    `null_heal` line and the `null` eval line."""
    run_dir = Path(run_dir)
    t0 = time.time()
    prev = list(getattr(model, "active_adapters", []) or [])
    kept, records = unsteered_data(model, tok, [r["prompt"] for r in steered_kept], p, seed=p.seed + 7_919,
                                   narration=demo.narration, progress=progress)
    write_jsonl(run_dir / "generated_null.jsonl", records)
    append_metrics(run_dir, dict(filt.filter_line(records, NULL), round=round_idx))
    model, log = heal.heal(model, tok, kept, p, round_idx=0, history=[], progress=progress, name=NULL)
    write_jsonl(run_dir / "heal_log_null.jsonl", log["steps"])
    append_metrics(run_dir, dict(heal.summary_line(log, p, round_idx), stage="null_heal", n_train=len(kept)))
    save_adapter(model, NULL, run_dir / "adapters" / NULL)
    with adapters(model, [NULL]):
        line = log_eval(run_dir, evaluate(model, tok, progress=progress, **eval_kwargs(p)), NULL, round_idx,
                        n_train=len(kept), generated=len(records), seconds_arm=time.time() - t0)
    if prev:  # back to the stack the arm started from, then the arm's adapter goes
        set_active(model, [n for n in prev if n != NULL])
    model = drop_adapter(model, NULL)
    return model, line
