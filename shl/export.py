"""Export a run as one merged model folder that plain transformers loads.

    python -m shl.export RUN_DIR OUT_DIR [--rounds N]

The base model named in the run's params.yaml gets the adapters of its finished rounds
(r0..r{N-1}) merged into its weights, the same stack the loop evaluates as "baked"; the folder
holds the model (safetensors), its tokenizer and `shl_export.json` saying where it came from.

The merge runs in float32 and the folder is saved in float32 by default (`--dtype`), whatever the
run's dtype: a LoRA update is far smaller than its weight, and W + BA rounded to bfloat16 loses
part of it (merging the history adapters for the loop's own reads in bfloat16 moved round 0's
healed authority 0.08 nats, benchmarks/results/bench_loop.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from shl.history import load_adapters
from shl.journal import PARAMS_FILE, completed_rounds, read_metrics, saved_history
from shl.models import load_model
from shl.params import ParamError, load_params

MANIFEST = "shl_export.json"
SAVE_DTYPES = ("float32", "bfloat16", "float16")


def adapters_to_merge(run_dir: Path, rounds: int | None = None) -> dict[str, Path]:
    """{r0: path, ..., r{N-1}: path} of the finished rounds to merge; errors say what to do."""
    run_dir = Path(run_dir)
    try:
        paths = saved_history(run_dir)
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir}/metrics.jsonl is not valid JSON lines ({e}): a truncated file? "
                         "`python -m shl.index` shows which line") from e
    if not paths:
        raise ValueError(f"{run_dir} has no finished loop round (no `round` line in metrics.jsonl): "
                         "export takes a 04_loop run folder")
    n = len(paths) if rounds is None else rounds
    if not 1 <= n <= len(paths):
        raise ValueError(f"rounds={rounds}, but {run_dir} finished rounds 0..{len(paths) - 1}: "
                         f"give --rounds between 1 and {len(paths)}")
    return dict(list(paths.items())[:n])


def _check_out_dir(out_dir: Path):
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty: give a new output folder or remove it")


def export_merged(run_dir, out_dir, rounds: int | None = None, dtype: str = "float32") -> Path:
    """Merge the run's adapters r0..r{rounds-1} (all finished rounds by default) into its base
    model in float32 and save it in `dtype`, with the tokenizer and shl_export.json, as `out_dir`."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {SAVE_DTYPES}, got {dtype!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    params_path = run_dir / PARAMS_FILE
    if not params_path.exists():
        raise FileNotFoundError(f"{params_path} does not exist: RUN_DIR must be a run folder (journal/<date>_...)")
    _check_out_dir(out_dir)
    p = load_params(str(params_path))
    paths = adapters_to_merge(run_dir, rounds)
    last = completed_rounds(read_metrics(run_dir))[len(paths) - 1]
    if last.get("stopped"):  # merged on purpose it is fine, but nobody should ship it by accident
        print(f"warning: round {last['round']} stopped the loop ({last['stop_reason']}); "
              f"--rounds {len(paths) - 1} exports the rounds before it")

    model, tok = load_model(p.model, "float32", p.device, p.seed)
    model = load_adapters(model, paths)
    merged = model.merge_and_unload(adapter_names=list(paths))
    if dtype != "float32":
        print(f"warning: saving in {dtype} rounds W + BA to {dtype}, which loses part of each LoRA update; "
              "the float32 default keeps it")
        merged = merged.to(getattr(torch, dtype))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # write beside out_dir and rename at the end: an interrupted export leaves no half-written model
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a model folder is for everyone to read
    try:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest = {"source_run": str(run_dir.resolve()), "adapters_merged": list(paths), "model": p.model,
                    "dtype": str(merged.dtype), "merged_in": "torch.float32",
                    "run_dtype": p.dtype, "demo": p.demo}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _check_out_dir(out_dir)  # again: the merge takes a while and someone may have written there
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m shl.export", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a 04_loop run folder holding adapters/r0, r1, ...")
    ap.add_argument("out_dir", help="the model folder to create (must not exist, or be empty)")
    ap.add_argument("--rounds", type=int, default=None, help="merge only r0..r{N-1} (default: every finished round)")
    ap.add_argument("--dtype", choices=SAVE_DTYPES, default="float32",
                    help="the saved weights' dtype (the merge itself is float32; bfloat16 rounds part of the update away)")
    args = ap.parse_args(argv)
    try:
        out = export_merged(args.run_dir, args.out_dir, args.rounds, args.dtype)
    except (ParamError, ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(out)
    return out


if __name__ == "__main__":
    main()
