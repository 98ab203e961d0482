"""Run folders: `journal/<date>_<notebook>_<slug>/` with params.yaml, metrics.jsonl and plots.

The Run folder contract (DESIGN.md) is a promise to the researchers' own scripts: file names
and metric keys here are kept exact.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import tempfile
from pathlib import Path

import yaml

from shl.params import ParamError, Params, collect_overrides, diff_params, load_params

REPO = Path(__file__).resolve().parent.parent
JOURNAL = Path(os.environ.get("SHL_JOURNAL", REPO / "journal"))
PARAMS_FILE, METRICS_FILE = "params.yaml", "metrics.jsonl"


def _atomic_write(path: Path, text: str):
    """Write to a temp file in the same folder, then rename: a crash leaves the old file whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a run folder is for everyone to read
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_slug(p: Params, overrides: dict) -> str:
    """`<slug or model name>[_<key><value>...]` for the overrides, so a sweep gets one folder per point."""
    parts = [p.slug or p.model.rstrip("/").split("/")[-1]]
    # a path-valued override (kept_from, contexts_file) is named by its last component
    parts += [f"{k}{Path(v).name if isinstance(v, str) and '/' in v else v}"
              for k, v in sorted(overrides.items()) if k != "slug"]
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts))[:120]


def default_run_dir(notebook: str, p: Params, overrides: dict) -> Path:
    return JOURNAL / f"{dt.date.today().isoformat()}_{notebook}_{default_slug(p, overrides)}"


def _params_diff(run_dir: Path, p: Params) -> dict:
    """{key: (there, now)} against the folder's params.yaml; {} when it has none."""
    path = Path(run_dir) / PARAMS_FILE
    return diff_params(yaml.safe_load(path.read_text()) or {}, p.to_dict()) if path.exists() else {}


def write_jsonl(path: Path, rows: list[dict]):
    _atomic_write(Path(path), "".join(json.dumps(r, default=float) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; [] when it does not exist."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def completed_rounds(lines: list[dict]) -> list[dict]:
    """The `round` lines of a loop run (each marks a finished round), in round order."""
    return sorted((r for r in lines if r.get("stage") == "round"), key=lambda r: r["round"])


def saved_history(run_dir: Path) -> dict[str, Path]:
    """{r0: adapters/r0, ...} of the finished rounds, after checking that the round lines run
    0..k in order and that every adapter is on disk (it is not in git: a clone has none)."""
    run_dir = Path(run_dir)
    done = [r["round"] for r in completed_rounds(read_metrics(run_dir))]
    if done != list(range(len(done))):
        raise RuntimeError(f"{run_dir}/metrics.jsonl has round lines {done}, not 0..k in order: "
                           "it was edited by hand; start a new run_dir")
    paths = {f"r{k}": run_dir / "adapters" / f"r{k}" for k in done}
    missing = [name for name, path in paths.items() if not (path / "adapter_config.json").exists()]
    if missing:
        raise RuntimeError(f"{run_dir} finished rounds {list(paths)} but adapters {missing} are not in adapters/ "
                           "(adapter weights are not committed to git): re-create the run in a new folder with "
                           f"`python -m shl.run notebooks/04_loop.ipynb --params {run_dir / PARAMS_FILE}`")
    return paths


def _resumable(run_dir: Path) -> bool:
    """A loop folder with finished rounds but without their adapters (a cloned, committed run)
    or with a truncated metrics file cannot be resumed; a default folder steps past it."""
    try:
        saved_history(run_dir)
    except (RuntimeError, json.JSONDecodeError):
        return False
    return True


def prepare_run_dir(run_dir: Path, p: Params) -> Path:
    """Create the folder and write params.yaml; an existing folder must hold the same params."""
    run_dir = Path(run_dir)
    diff = _params_diff(run_dir, p)
    if diff:
        lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ParamError(f"{run_dir} was made with other parameters ({lines}); use a new run_dir or the same parameters")
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / PARAMS_FILE, yaml.safe_dump(p.to_dict(), sort_keys=False))
    return run_dir


def resolve_run(preset: str, run_dir: str, overrides: dict, notebook: str) -> tuple[Params, Path]:
    """Validate, then create the run folder. A given run_dir must hold the same params (resume);
    the default one steps to `_2`, `_3`, ... past folders made with other params or that cannot
    be resumed (finished rounds without their adapters)."""
    p = load_params(preset, **overrides)
    from shl.demos import check_inputs
    check_inputs(p)
    if run_dir:
        return p, prepare_run_dir(Path(run_dir), p)
    return p, prepare_run_dir(pick_run_dir(notebook, p, overrides), p)


def pick_run_dir(notebook: str, p: Params, overrides: dict, taken: set = frozenset()) -> Path:
    """The default run folder for these params, without creating it: `default_run_dir`, stepped
    to `_2`, `_3`, ... past folders made with other params, folders that cannot be resumed and
    the folders in `taken` (a sweep's other points)."""
    base = default_run_dir(notebook, p, overrides)
    candidate, i = base, 2
    while candidate in taken or _params_diff(candidate, p) or not _resumable(candidate):
        candidate, i = base.with_name(f"{base.name}_{i}"), i + 1
    return candidate


def start_run(namespace: dict, notebook: str) -> tuple[Params, Path]:
    """In a notebook, right after the parameters cell: validate every injected parameter, create
    the run folder and write params.yaml. Returns (params, run_dir)."""
    overrides = collect_overrides(namespace)
    return resolve_run(namespace.get("params", "default"), namespace.get("run_dir", ""), overrides, notebook)


def append_metrics(run_dir: Path, record: dict):
    """Append one JSON line; the file is rewritten atomically, so earlier lines survive any crash."""
    if "stage" not in record:
        raise ValueError("every metrics line needs a 'stage' key")
    path = Path(run_dir) / METRICS_FILE
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    _atomic_write(path, old + json.dumps(record, default=float) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def seed_everything(seed: int):
    import numpy as np  # here, not at the top: `python -m shl.run` imports this module without torch
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log_eval(run_dir: Path, result, stage: str, round: int = -1, rows_name: str = "", **extra) -> dict:
    """Append the eval's metrics line and keep its per-vignette rows as evals/<stage>_r<round>.jsonl
    (or evals/<rows_name>.jsonl, for a stage evaluated more than once per round), and the trait
    probe's per-item rows beside them as ..._probe.jsonl."""
    record = result.record(stage, round, **extra)
    append_metrics(run_dir, record)
    rows_dir = Path(run_dir) / "evals"
    rows_dir.mkdir(exist_ok=True)
    name = rows_name or f"{stage}_r{round}"
    write_jsonl(rows_dir / f"{name}.jsonl", result.rows)
    if getattr(result, "probe_rows", None):
        write_jsonl(rows_dir / f"{name}_probe.jsonl", result.probe_rows)
    return record


FINDINGS = "## Findings"


def write_entry(run_dir: Path, title: str, body: str):
    """Write entry.md: the generated body, then the researcher's Findings section, kept verbatim
    from an earlier entry.md when there is one (regenerating never loses what a person wrote)."""
    path = Path(run_dir) / "entry.md"
    old = path.read_text() if path.exists() else ""
    findings = (old[old.index(FINDINGS):] if FINDINGS in old
                else f"{FINDINGS}\n\n_(for the researcher: what this run shows, what to try next)_\n")
    _atomic_write(path, f"# {title}\n\n{body.strip()}\n\n{findings}")
    return path


def md_cell(v, width: int | None = None) -> object:
    """A markdown-safe table cell: one line, pipes escaped, cut to `width`; floats stay floats so
    md_table rounds them."""
    if v is None:
        return ""
    if isinstance(v, float):
        return v
    if isinstance(v, list):
        v = "[" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) + "]"
    text = " ".join(str(v).split()).replace("|", "\\|")
    return text if width is None or len(text) <= width else text[:width - 3] + "..."


def md_table(rows: list[dict], cols: list[str], digits: int = 3) -> str:
    """A markdown table of the given columns (numbers rounded)."""
    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
