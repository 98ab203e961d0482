"""Sweeps: one run folder per point, each run by papermill as a submitit job (local or SLURM).

    python -m shl.sweep SPEC.yaml [--executor local|slurm] [--parallel N] [--dry-run] [--table]
                                  [--partition P] [--gpus G] [--time MIN] [--mem 32G] [--slurm KEY=VALUE ...]
                                  [--no-wait]

A spec is a YAML file:

    notebook: notebooks/03_heal.ipynb      # the notebook every point runs
    params: default                        # the preset (a name under params/ or a YAML path)
    fixed: {kept_from: journal/...}        # overrides every point shares
    grid: {reg: [kl_rev, kl_fwd], tau: [0.01, 0.05]}   # axes: every combination is a point
    points: [{reg: nll}]                   # and/or single points, added to the grid's
    seeds: [0, 1]                          # every point above, once per seed
    name: heal_barrier                     # the sweep folder's name (default: the spec file's stem)

Each point is one run folder named after the values that make it a point (the naming of
`python -m shl.run`), under journal/. The sweep's own folder, journal/sweeps/<name>/, holds the
spec, `sweep.json` (per point: its overrides, run folder, job id, state, log path, error line,
seconds), the jobs' logs, and at the end (or with --table) `table.md` and `pareto.png`.

A point whose run folder holds a finished executed notebook is skipped; a failed or killed one
is launched again and resumes (the loop continues after its last finished round). Every check
(the spec, each point's parameters and input files, the executor and its options) runs before
anything is submitted, and a bad one stops the sweep with one line.

From a notebook cell: `shl.sweep.main(["sweeps/heal_barrier.yaml", "--dry-run"])`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from submitit.helpers import Checkpointable

from shl import index, plots, run
from shl.demos import check_inputs
from shl.journal import JOURNAL, REPO, _atomic_write, md_cell, md_table, pick_run_dir
from shl.params import NOTEBOOK_PARAMS, ParamError, load_params

SPEC_KEYS = ("notebook", "params", "fixed", "grid", "points", "seeds", "name")
EXECUTORS = ("local", "slurm")
STATE_FILE, TABLE_FILE, PARETO_FILE = "sweep.json", "table.md", "pareto.png"
# what a point's log shows on the sweep's terminal: the loop's round lines and resume notes
PROGRESS_RE = re.compile(r"^(round \d+:|stopping after round|resuming |discarded a half-written round)")
# no time limit for a local point unless --time is given (submitit's local default is 2 minutes)
LOCAL_TIME_MIN = 30 * 24 * 60
POLL_S = 2.0
# sacct states of a SLURM job that is still to run or running
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
                "REQUEUE_FED", "STAGE_OUT", "SIGNALING")


def sweeps_dir() -> Path:
    return JOURNAL / "sweeps"


# --- the spec ----------------------------------------------------------------------------------

def _axis(where: str, key: str, values) -> list:
    if not isinstance(values, list) or not values:
        raise ParamError(f"{where} '{key}' must be a non-empty list of values, got {values!r}")
    return values


def _overrides(where: str, d) -> dict:
    if not isinstance(d, dict):
        raise ParamError(f"{where} must be a mapping of parameter: value, got {d!r}")
    reserved = sorted(set(d) & set(NOTEBOOK_PARAMS))
    if reserved:
        raise ParamError(f"{where} sets {reserved[0]}: give the preset as the spec's `params`; "
                         "a sweep chooses each point's run folder itself")
    return d


def read_spec(path: Path) -> dict:
    """The spec file, checked for shape (its values are checked per point by `plan`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"no sweep spec {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamError(f"{path} is not YAML: {str(e).splitlines()[0]}")
    if not isinstance(spec, dict):
        raise ParamError(f"{path} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ParamError(f"{path}: unknown key '{unknown[0]}'; a spec has {', '.join(SPEC_KEYS)}")
    if "notebook" not in spec:
        raise ParamError(f"{path} names no notebook (e.g. notebook: notebooks/04_loop.ipynb)")
    spec = {"params": "default", "fixed": {}, "grid": {}, "points": [], "name": path.stem, **spec}
    spec["notebook"] = _rel(run.find_notebook(spec["notebook"]))
    _overrides("fixed", spec["fixed"] or {})
    grid = _overrides("grid", spec["grid"] or {})
    for key, values in grid.items():
        _axis("grid axis", key, values)
    if not isinstance(spec["points"], list):
        raise ParamError(f"points must be a list of mappings, got {spec['points']!r}")
    for i, point in enumerate(spec["points"]):
        _overrides(f"points[{i}]", point)
    if "seeds" in spec:
        _axis("axis", "seeds", spec["seeds"])
    if not isinstance(spec["name"], str) or not re.fullmatch(r"[A-Za-z0-9._-]+", spec["name"]):
        raise ParamError(f"name {spec['name']!r} must be a folder name (letters, digits, . _ -)")
    return spec


def expand(spec: dict) -> list[dict]:
    """The points as {parameter: value} of what makes each one a point (fixed overrides apart):
    the grid's combinations, then the single points, each once per seed."""
    grid = spec["grid"] or {}
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    points += [dict(p) for p in spec["points"]]
    if not points and (spec.get("fixed") or "seeds" in spec):
        points = [{}]  # only fixed overrides and/or seeds: one point (per seed)
    if not points:
        raise ParamError("the spec has no points: give a grid, points, or seeds")
    if "seeds" in spec:
        if "seed" in (spec["fixed"] or {}) or any("seed" in p for p in points):
            raise ParamError("seed is set both by `seeds` and by a grid, point or fixed override; give it once")
        points = [{**p, "seed": s} for p in points for s in spec["seeds"]]
    for p in points:
        both = sorted(set(p) & set(spec["fixed"] or {}))
        if both:
            raise ParamError(f"'{both[0]}' is both fixed and an axis; give it once")
    seen = set()
    for p in points:
        key = json.dumps(p, sort_keys=True)
        if key in seen:
            raise ParamError(f"the point {p} comes twice (grid and points overlap)")
        seen.add(key)
    return points


# --- the points -------------------------------------------------------------------------------

@dataclass
class Point:
    varying: dict  # what makes it a point
    overrides: dict  # fixed + varying: what the notebook gets
    run_dir: Path
    params: dict = field(repr=False, default_factory=dict)  # the resolved parameters
    record: dict = field(default_factory=dict)  # its entry in sweep.json

    @property
    def label(self) -> str:
        return _label(self.varying)


def _short(v) -> str:
    return Path(v).name if isinstance(v, str) and "/" in v else f"{v:g}" if isinstance(v, float) else str(v)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _abs(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO / path


def plan(spec: dict, state: dict | None = None) -> list[Point]:
    """Validate every point (parameters and input files) and give each its run folder: the one
    an earlier launch recorded for the same overrides, else a new default folder."""
    nb = run.find_notebook(spec["notebook"])
    recorded = {json.dumps(r["overrides"], sort_keys=True): r for r in (state or {}).get("points", [])}
    points, taken = [], set()
    for varying in expand(spec):
        overrides = {**(spec["fixed"] or {}), **varying}
        try:
            p = load_params(spec["params"], **overrides)
            check_inputs(p)
        except ParamError as e:
            raise ParamError(f"point {_label(varying)}: {e}")
        old = recorded.get(json.dumps(overrides, sort_keys=True))
        run_dir = _abs(old["run_dir"]) if old else pick_run_dir(nb.stem, p, varying, taken)
        taken.add(run_dir)
        points.append(Point(varying, overrides, run_dir, p.to_dict(), dict(old or {})))
    return points


def _label(varying: dict) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in varying.items()) or "(the single point)"


def finished(run_dir: Path, notebook: str) -> bool:
    """The run folder holds the executed notebook, run to its end without an error (papermill
    writes end_time when it stops and marks a failed cell; a killed run has no end_time)."""
    import nbformat
    path = Path(run_dir) / Path(notebook).name
    if not path.exists():
        return False
    try:
        meta = nbformat.read(path, as_version=4).metadata.get("papermill", {})
    except Exception:  # a notebook cut short mid-write
        return False
    return bool(meta.get("end_time")) and not meta.get("exception")


# --- the job ----------------------------------------------------------------------------------

class RunPoint(Checkpointable):
    """One point, run in the job: validate, then papermill with the notebook's output streamed
    into the job's log. On a SLURM time-out or pre-emption submitit requeues the same call, and
    the loop resumes after its last finished round."""

    def __call__(self, notebook: str, preset: str, run_dir: str, overrides: dict, kernel: str = run.KERNEL) -> str:
        # the log is a file, not a screen: one bar update per 10 s keeps it readable
        os.environ.setdefault("TQDM_MININTERVAL", "10")
        nb, folder = run.prepare(_abs(notebook), preset, run_dir, overrides)
        run.execute(nb, folder, {"params": preset, "run_dir": str(folder), **overrides}, kernel, stream=True)
        return str(folder)


# --- executors --------------------------------------------------------------------------------

@dataclass
class ExecutorOptions:
    kind: str = "local"
    parallel: int = 1
    partition: str = ""
    gpus: int = 0
    time: int = 0  # minutes; 0 = no limit (local) / the cluster's default (slurm)
    mem: str = ""
    slurm: dict = field(default_factory=dict)


def check_executor(opts: ExecutorOptions, launching: bool = True):
    """Everything about the executor that can be checked before a folder is made (launching:
    also that this machine can submit to it)."""
    if opts.kind not in EXECUTORS:
        raise ParamError(f"unknown executor '{opts.kind}': use one of {', '.join(EXECUTORS)}")
    if opts.parallel < 1:
        raise ParamError(f"--parallel {opts.parallel} must be >= 1")
    if opts.kind == "local" and (opts.partition or opts.gpus or opts.mem or opts.slurm):
        raise ParamError("--partition, --gpus, --mem and --slurm are SLURM options: add --executor slurm "
                         "(a local point gets one of this machine's GPUs by itself)")
    if opts.kind == "slurm":
        from submitit import SlurmExecutor
        unknown = sorted(set(opts.slurm) - SlurmExecutor._valid_parameters())
        if unknown:
            raise ParamError(f"unknown SLURM option '{unknown[0]}'; valid: {', '.join(sorted(SlurmExecutor._valid_parameters()))}")
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing and launching:
            raise ParamError(f"--executor slurm needs {' and '.join(missing)} on PATH: launch from the cluster's login node")


def _gpu_ids() -> list[str]:
    """The GPUs this machine shows (respecting CUDA_VISIBLE_DEVICES), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [g.strip() for g in out.splitlines() if g.strip()]


def make_executor(opts: ExecutorOptions, folder: Path, n_points: int):
    """A submitit executor writing its scripts, pickles and logs into `folder`."""
    import submitit
    if opts.kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=opts.time or LOCAL_TIME_MIN)
        return ex
    ex = submitit.SlurmExecutor(folder=folder)
    params = {"job_name": f"shl-{folder.parent.name}", "array_parallelism": min(opts.parallel, n_points)}
    if opts.partition:
        params["partition"] = opts.partition
    if opts.gpus:
        params["gpus_per_node"] = opts.gpus
    if opts.time:
        params["time"] = opts.time
    if opts.mem:
        params["mem"] = opts.mem
    try:
        ex.update_parameters(**params, **opts.slurm)
    except (ValueError, TypeError) as e:
        raise ParamError(f"SLURM options rejected: {str(e).splitlines()[0]}")
    return ex


def gpu_setup(slot: int, gpus: list[str]) -> list[str]:
    """Shell lines that give local point number `slot` one GPU (round robin over `gpus`); none on
    a CPU machine. submitit's local executor sets CUDA_VISIBLE_DEVICES to the GPUs it was asked
    for, so a job that asks for none would see no GPU and run on the CPU."""
    return [f"export CUDA_VISIBLE_DEVICES={shlex.quote(gpus[slot % len(gpus)])}"] if gpus else []


# --- the sweep folder -------------------------------------------------------------------------

def load_state(sweep_dir: Path) -> dict | None:
    path = Path(sweep_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def save_state(sweep_dir: Path, spec: dict, opts: ExecutorOptions, points: list[Point]):
    state = {"spec": spec, "executor": opts.kind,
             "points": [{"label": pt.label, "varying": pt.varying, "overrides": pt.overrides,
                         "run_dir": _rel(pt.run_dir), **{k: v for k, v in pt.record.items()
                                                          if k not in ("label", "varying", "overrides", "run_dir")}}
                        for pt in points]}
    path, text = Path(sweep_dir) / STATE_FILE, json.dumps(state, indent=1, default=str) + "\n"
    if not path.exists() or path.read_text() != text:  # the launcher saves on every poll
        _atomic_write(path, text)


def job_error(text: str) -> str:
    """The error line of a failed job: submitit's message is the job's traceback (papermill's ends
    with the failing cell's `Exception: message`), then where the logs are."""
    return _error_line(text.split("\n----------------------\nYou can check full logs")[0])


def _error_line(text: str) -> str:
    """The last line of a traceback that says what went wrong."""
    lines = [s.strip() for s in str(text).splitlines() if s.strip() and not set(s.strip()) <= set("-=^~ ")]
    return lines[-1][:300] if lines else ""


# --- launching --------------------------------------------------------------------------------

def _alive_local(job_id: str) -> bool:
    """A local job (its controller process) from an earlier launch still running."""
    try:
        return "submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return False


class _Watch:
    """Follow one running job: its state, and the progress lines of its log."""

    def __init__(self, pt: Point, job):
        self.pt, self.job, self.offset, self.last = pt, job, 0, ""

    def progress_lines(self) -> list[str]:
        path = Path(str(self.job.paths.stdout))
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        self.offset += cut
        lines = [s for s in data[:cut].decode(errors="replace").splitlines() if PROGRESS_RE.match(s)]
        self.last = lines[-1] if lines else self.last
        return lines


def _finish(pt: Point, job, notebook: str, started: float, last_progress: str):
    pt.record["seconds"] = round(pt.record.get("seconds", 0.0) + time.time() - started, 1)
    if finished(pt.run_dir, notebook):
        pt.record.update(state="finished", error="")
        return
    if not Path(job.paths.result_pickle).exists():  # the job's python never got to report
        error = ("the job ended without a result (killed, out of memory or out of time)"
                 + (f" after: {last_progress}" if last_progress else ""))
    else:
        error = job_error(str(job.exception()))
    pt.record.update(state="failed", error=error or f"the job ended in state {job.state}")


def _attach_slurm(todo: list[Point], jobs_dir: Path, resubmit: bool, out) -> list[tuple[Point, object]]:
    """The points whose SLURM job from an earlier launch is still queued or running: follow
    those jobs instead of submitting the points again (two jobs on one folder would clash)."""
    import submitit
    attached = []
    for pt in todo:
        if pt.record.get("executor") != "slurm" or not pt.record.get("job_id"):
            continue
        job = submitit.SlurmJob(folder=jobs_dir, job_id=pt.record["job_id"])
        state = job.state.split()[0] if job.state else "UNKNOWN"
        if state in SLURM_ACTIVE:
            out(f"follow {pt.label}: job {job.job_id} is {state}")
            attached.append((pt, job))
        elif state == "UNKNOWN" and not resubmit:
            raise ParamError(f"cannot read the state of SLURM job {job.job_id} ({pt.label}) with sacct: "
                             "check `squeue`; if it is gone, launch again with --resubmit")
    return attached


def _poll(w: _Watch, notebook: str, started: float, out) -> bool:
    """Print the job's new progress lines and note its state; True once it has ended."""
    for line in w.progress_lines():
        out(f"[{w.pt.label}] {line}")
    if not w.job.done():
        if w.pt.record.get("state") == "submitted" and w.job.state == "RUNNING":  # a SLURM job started
            w.pt.record["state"] = "running"
        return False
    for line in w.progress_lines():  # what it wrote between the two looks
        out(f"[{w.pt.label}] {line}")
    _finish(w.pt, w.job, notebook, started, w.last)
    out(f"{w.pt.record['state']} {w.pt.label} after {w.pt.record['seconds']:.0f} s"
        + (f": {w.pt.record['error']}" if w.pt.record["error"] else ""))
    return True


def _unfinished(points: list[Point], notebook: str, out) -> list[Point]:
    """The points to run: not finished, and not still running from an earlier local launch."""
    todo = []
    for pt in points:
        if finished(pt.run_dir, notebook):
            pt.record.update(state="finished", error="")
            out(f"skip {pt.label}: {_rel(pt.run_dir)} is finished")
        else:
            todo.append(pt)
    busy = [pt for pt in todo if pt.record.get("executor") == "local" and pt.record.get("state") == "running"
            and _alive_local(pt.record.get("job_id", ""))]
    if busy:
        raise ParamError(f"point {busy[0].label} is still running as process {busy[0].record['job_id']} "
                         "from an earlier launch: wait for it or stop it")
    return todo


def launch(spec: dict, points: list[Point], opts: ExecutorOptions, sweep_dir: Path, wait: bool = True,
           resubmit: bool = False, out=print) -> list[Point]:
    """Submit the unfinished points and (wait) follow them to the end. Returns the points."""
    notebook = spec["notebook"]
    todo = _unfinished(points, notebook, out)
    jobs_dir = sweep_dir / "jobs"
    attached = _attach_slurm(todo, jobs_dir, resubmit, out) if opts.kind == "slurm" else []
    todo = [pt for pt in todo if all(pt is not a for a, _ in attached)]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    save_state(sweep_dir, spec, opts, points)
    if not todo and not attached:
        out("nothing to run: every point is finished")
        return points
    ex = make_executor(opts, jobs_dir, max(len(todo), 1))
    call = RunPoint()

    def submitted(pt, job):
        pt.record.update(state="running" if opts.kind == "local" else "submitted", executor=opts.kind,
                         job_id=str(job.job_id), log=_rel(job.paths.stdout), log_err=_rel(job.paths.stderr),
                         error="", launches=pt.record.get("launches", 0) + 1)
        out(f"{'start' if opts.kind == 'local' else 'submitted'} {pt.label}: job {job.job_id}, "
            f"folder {_rel(pt.run_dir)}, log {_rel(job.paths.stdout)}")

    args = lambda pt: (notebook, spec["params"], str(pt.run_dir), pt.overrides)  # noqa: E731
    watches = [_Watch(pt, job) for pt, job in attached]
    started = {pt.label: time.time() for pt, _ in attached}
    if opts.kind == "slurm":
        if todo:
            with ex.batch():
                jobs = [ex.submit(call, *args(pt)) for pt in todo]
            for pt, job in zip(todo, jobs):
                submitted(pt, job)
                watches.append(_Watch(pt, job))
                started[pt.label] = time.time()
        todo = []
        save_state(sweep_dir, spec, opts, points)
        if not wait:
            out(f"{len(watches)} points queued or running; follow them with squeue, and write the table with "
                "`python -m shl.sweep SPEC --table`")
            return points
    gpus = _gpu_ids() if opts.kind == "local" else []
    slot = 0
    try:
        while todo or watches:
            while opts.kind == "local" and todo and len(watches) < opts.parallel:
                pt = todo.pop(0)
                ex.update_parameters(setup=gpu_setup(slot, gpus))
                slot += 1
                job = ex.submit(call, *args(pt))
                submitted(pt, job)
                watches.append(_Watch(pt, job))
                started[pt.label] = time.time()
                save_state(sweep_dir, spec, opts, points)
            time.sleep(POLL_S)
            for w in list(watches):
                if _poll(w, notebook, started[w.pt.label], out):
                    watches.remove(w)
                    write_table(sweep_dir, spec, points)
                save_state(sweep_dir, spec, opts, points)
    except KeyboardInterrupt:
        for w in watches:
            w.pt.record.update(state="interrupted", error="the sweep was interrupted")
            if opts.kind == "local":
                w.job.cancel()
        save_state(sweep_dir, spec, opts, points)
        out("interrupted: " + ("local points stopped" if opts.kind == "local" else "SLURM jobs go on")
            + "; launch again to resume")
        raise
    return points


# --- the table and the Pareto plot -------------------------------------------------------------

def rows(spec: dict, points: list[Point]) -> tuple[list[dict], list[str]]:
    """One row per point from shl.index.scan_run of its folder, and the parameters that vary."""
    keys = index.differing_keys([pt.params for pt in points])
    out = []
    for pt in points:
        r = index.scan_run(pt.run_dir) if pt.run_dir.exists() else {"rounds": 0, "headline": None, "status": "not run"}
        h = r.get("headline") or {}
        coh, base = h.get("coherence"), h.get("base_coherence")
        out.append({"point": pt.label, "state": pt.record.get("state", "not launched"), "status": r["status"],
                    "rounds done": r["rounds"], **{k: pt.params.get(k) for k in keys},
                    "d_trait": h.get("d_trait"), "beyond null": h.get("d_trait_beyond_null"),
                    "off beyond null": h.get("off_target_beyond_null_move"),
                    "coh x base": coh / base if coh is not None and base else None,
                    "cost": h.get("cost"), "verdict": h.get("verdict"), "all verdicts": h.get("verdicts"),
                    "seconds": pt.record.get("seconds"),
                    "run": pt.run_dir})
    return out, keys


def render_table(spec: dict, table: list[dict], keys: list[str], sweep_dir: Path) -> str:
    cols = ["point", "state", "rounds done", *keys, "d_trait", "beyond null", "off beyond null", "coh x base", "cost",
            "verdict", "all verdicts", "seconds", "run"]
    cells = []
    for r in table:
        link = os.path.relpath(r["run"], sweep_dir)
        c = {k: md_cell(v) for k, v in r.items() if k not in keys and k != "run"}
        c.update({k: index._param_cell(r[k]) for k in keys})
        c["all verdicts"] = md_cell(("+".join(r["all verdicts"]) or "pass") if isinstance(r["all verdicts"], list) else "")
        c["seconds"] = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
        c["run"] = f"[{r['run'].name}]({link})"
        cells.append(c)
    fixed = ", ".join(f"{k}={_short(v)}" for k, v in (spec["fixed"] or {}).items()) or "none"
    text = (f"# Sweep {spec['name']}\n\n`{spec['notebook']}`, preset `{spec['params']}`, fixed: {fixed}. "
            "Regenerate with `python -m shl.sweep <spec> --table`.\n\n"
            "One row per point. d_trait: the last healed model's move toward the trait vs base (nats); "
            "beyond null: the same minus the null control arm's move; off beyond null: the largest move of another "
            "foundation beyond the null; coh x base: its coherence over base coherence; cost = |d_coh| / |d_trait|; "
            "verdict: the first failure (or pass), all verdicts: every one that applies (see `shl.loop.headline`); "
            "seconds: wall time of the point's jobs in this sweep.\n\n"
            + md_table(cells, cols) + "\n")
    problems = [r for r in table if r["status"] not in ("ok",)]
    if problems:
        text += "\n## Problems\n\n" + "".join(f"- {r['point']}: {r['status']}\n" for r in problems)
    if (sweep_dir / PARETO_FILE).exists():
        text += f"\n![Pareto]({PARETO_FILE})\n"
    return text


def write_table(sweep_dir: Path, spec: dict, points: list[Point]) -> Path:
    """table.md and pareto.png in the sweep folder (the plot only once a point has a headline)."""
    import matplotlib.pyplot as plt
    table, keys = rows(spec, points)
    marks = [(r["point"], r["d_trait"], r["coh x base"], r["verdict"]) for r in table
             if r["d_trait"] is not None and r["coh x base"] is not None]
    pareto = Path(sweep_dir) / PARETO_FILE
    if marks:
        fig = plots.plot_sweep_pareto(marks, f"sweep {spec['name']}")
        plots.save(fig, sweep_dir, pareto.stem)
        plt.close(fig)
    path = Path(sweep_dir) / TABLE_FILE
    _atomic_write(path, render_table(spec, table, keys, Path(sweep_dir)))
    return path


# --- CLI --------------------------------------------------------------------------------------

def _slurm_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--slurm {text}: give KEY=VALUE (e.g. account=myproj)")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m shl.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="the sweep's YAML spec, e.g. sweeps/heal_barrier.yaml")
    ap.add_argument("--executor", default="local", help="local (default: jobs on this machine) or slurm")
    # one at a time: on a 2-core CPU two torch jobs thrash (an eval went from 27 s to 170 s);
    # on a box with several GPUs, give one per GPU (each local point gets its own GPU)
    ap.add_argument("--parallel", type=int, default=None,
                    help="points running at once (local default 1: two torch jobs on a small CPU thrash; "
                         "slurm default: all, as one job array)")
    ap.add_argument("--dry-run", action="store_true", help="list the points and their run folders, submit nothing")
    ap.add_argument("--table", action="store_true", help="write the sweep's table.md and pareto.png now, run nothing")
    ap.add_argument("--no-wait", action="store_true", help="slurm: submit and return instead of following the jobs")
    ap.add_argument("--resubmit", action="store_true",
                    help="slurm: submit points whose earlier job's state sacct cannot tell (check squeue first)")
    ap.add_argument("--kernel", default=run.KERNEL)
    slurm = ap.add_argument_group("SLURM (with --executor slurm)")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--gpus", type=int, default=0, help="GPUs per point (gpus_per_node)")
    slurm.add_argument("--time", type=int, default=0, help="minutes per point (also a local time limit)")
    slurm.add_argument("--mem", default="", help="memory per point, e.g. 64G")
    slurm.add_argument("--slurm", type=_slurm_option, action="append", default=[], metavar="KEY=VALUE",
                       help="any other submitit SLURM parameter (account=..., qos=..., constraint=..., cpus_per_task=8)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    opts = ExecutorOptions(kind=args.executor, partition=args.partition, gpus=args.gpus, time=args.time,
                           mem=args.mem, slurm=dict(args.slurm),
                           parallel=args.parallel if args.parallel is not None else (1 if args.executor == "local" else 10**6))
    try:
        check_executor(opts, launching=False)
        spec = read_spec(Path(args.spec))
        sweep_dir = sweeps_dir() / spec["name"]
        state = load_state(sweep_dir)
        if state and (state["spec"]["notebook"], state["spec"]["params"]) != (spec["notebook"], spec["params"]):
            raise ParamError(f"{_rel(sweep_dir)} is a sweep of {state['spec']['notebook']} with preset "
                             f"{state['spec']['params']}: give this spec another `name`")
        points = plan(spec, state)
        if args.table:
            if not sweep_dir.exists():
                raise ParamError(f"no sweep folder {_rel(sweep_dir)}: launch the sweep first")
            path = write_table(sweep_dir, spec, points)
            print(path.read_text())
            return points
        if not args.dry_run:
            check_executor(opts)
            run.check_kernel(args.kernel)
    except ParamError as e:
        raise SystemExit(f"error: {e}")
    print(f"sweep {spec['name']}: {len(points)} points of {spec['notebook']} (preset {spec['params']}), "
          f"executor {opts.kind}" + (f", {opts.parallel} at a time" if opts.kind == "local" else ""))
    if args.dry_run:
        for pt in points:
            done = " (finished: skipped)" if finished(pt.run_dir, spec["notebook"]) else ""
            print(f"  {pt.label:<40} {_rel(pt.run_dir)}{done}")
        return points
    try:
        launch(spec, points, opts, sweep_dir, wait=not args.no_wait, resubmit=args.resubmit)
    except ParamError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(130)
    if opts.kind == "local" or not args.no_wait:
        path = write_table(sweep_dir, spec, points)
        failed = [pt for pt in points if pt.record.get("state") != "finished"]
        print(f"table: {_rel(path)}" + (f"; {len(failed)} points not finished: launch again to resume" if failed else ""))
        if failed:
            raise SystemExit(1)
    return points


if __name__ == "__main__":
    main()
