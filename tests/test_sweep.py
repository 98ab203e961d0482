"""Sweeps (shl.sweep): the spec, bad specs stop with one line, a 2x2 tiny sweep through submitit's
local executor survives a killed point, and the SLURM submission script asks for what was given."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shl import plots, sweep
from shl.params import ParamError

ROOT = Path(__file__).resolve().parent.parent
TINY_LOOP = {"notebook": "notebooks/04_loop.ipynb", "params": "tiny", "fixed": {"eval_n": 7}}


def _spec(tmp_path, name="s", **spec) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _sweep(args, journal, timeout=60, path_prefix=None, **kw):
    env = {**os.environ, "SHL_JOURNAL": str(journal)}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "shl.sweep", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


# --- the spec ----------------------------------------------------------------------------------

def test_points_are_the_grid_then_the_single_points_each_once_per_seed(tmp_path):
    spec = sweep.read_spec(_spec(tmp_path, **TINY_LOOP, grid={"reg": ["kl_rev", "kl_fwd"], "tau": [0.1, 0.2]},
                                 points=[{"reg": "nll"}], seeds=[0, 1]))
    points = sweep.expand(spec)
    assert len(points) == (2 * 2 + 1) * 2
    assert points[0] == {"reg": "kl_rev", "tau": 0.1, "seed": 0} and points[-1] == {"reg": "nll", "seed": 1}
    assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)


@pytest.mark.parametrize("spec, message", [
    ({**TINY_LOOP, "grid": {"lamb": [0.1, 0.3]}}, "unknown parameter 'lamb' (did you mean lam?)"),
    ({**TINY_LOOP, "grid": {"lam": []}}, "grid axis 'lam' must be a non-empty list"),
    ({**TINY_LOOP, "grid": {"lam": 0.3}}, "grid axis 'lam' must be a non-empty list"),
    ({**TINY_LOOP, "seeds": []}, "axis 'seeds' must be a non-empty list"),
    ({**TINY_LOOP, "notebook": "notebooks/05_nothing.ipynb", "seeds": [0]}, "no notebook notebooks/05_nothing.ipynb"),
    ({**TINY_LOOP, "grid": {"lam": [0.1]}, "points": [{"lam": 0.1}]}, "comes twice"),
    ({**TINY_LOOP, "grid": {"seed": [0]}, "seeds": [1]}, "seed is set both by `seeds`"),
    ({**TINY_LOOP, "grid": {"run_dir": ["a"]}}, "sets run_dir"),
    ({**TINY_LOOP, "grid": {"tau": [-1.0]}}, "point tau=-1: parameter 'tau' = -1.0 must be >= 0"),
    ({**TINY_LOOP, "grids": {"lam": [0.1]}}, "unknown key 'grids'"),
    ({"notebook": "notebooks/04_loop.ipynb", "params": "tiny"}, "the spec has no points"),
])
def test_a_bad_spec_stops_with_one_line_before_anything_is_made(tmp_path, monkeypatch, capsys, spec, message):
    journal = tmp_path / "journal"
    monkeypatch.setattr(sweep, "JOURNAL", journal)
    monkeypatch.setattr("shl.journal.JOURNAL", journal)
    with pytest.raises(SystemExit) as stop:
        sweep.main([str(_spec(tmp_path, **spec))])
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text
    assert not journal.exists() and capsys.readouterr().out == ""


def test_an_unknown_executor_stops_the_cli_with_one_line(tmp_path):
    out = _sweep([_spec(tmp_path, **TINY_LOOP, seeds=[0, 1]), "--executor", "pbs"], tmp_path / "journal")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["error: unknown executor 'pbs': use one of local, slurm"]
    assert out.stdout == "" and not (tmp_path / "journal").exists()


def test_dry_run_lists_the_points_and_their_folders_and_makes_nothing(tmp_path, monkeypatch, capsys):
    journal = tmp_path / "journal"
    monkeypatch.setattr(sweep, "JOURNAL", journal)
    monkeypatch.setattr("shl.journal.JOURNAL", journal)
    points = sweep.main([str(_spec(tmp_path, **TINY_LOOP, grid={"lam": [0.5, 1.0]}, seeds=[0, 1])), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert "4 points" in lines[0] and "1 at a time" in lines[0]
    assert [p.label for p in points] == ["lam=0.5 seed=0", "lam=0.5 seed=1", "lam=1 seed=0", "lam=1 seed=1"]
    for p, line in zip(points, lines[1:]):
        assert p.run_dir.parent == journal and p.run_dir.name.endswith(f"_04_loop_tiny-random_lam{p.varying['lam']}_seed{p.varying['seed']}")
        assert line.split()[-1] == str(p.run_dir)
    assert not journal.exists()


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    pts = [(0.1, 1.0), (0.5, 0.9), (0.4, 0.8), (0.9, 0.5), (0.9, 0.4), (0.0, 0.95)]
    assert plots.pareto_front(pts) == [0, 1, 3]


def test_a_failed_jobs_error_line_is_the_exception_not_the_log_paths():
    text = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback...\n"
            "---------------------------------------------------------------------------\n"
            "NoMatchingPeftModuleError: Target modules nothing_proj not found in the base model.\n\n\n"
            "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
            "  - /x/jobs/1_0_log.err\n  - /x/jobs/1_0_log.out")
    assert sweep.job_error(text) == "NoMatchingPeftModuleError: Target modules nothing_proj not found in the base model."


def test_a_spec_may_not_name_a_preset_or_run_dir_as_an_override(tmp_path):
    with pytest.raises(ParamError, match="sets params"):
        sweep.read_spec(_spec(tmp_path, **{**TINY_LOOP, "fixed": {"params": "default"}}))


# --- SLURM without a cluster -------------------------------------------------------------------

FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keeps the script it was given, answers like sbatch
cp "$1" "$(dirname "$0")/submitted_$(ls "$(dirname "$0")" | grep -c submitted_).sh"
echo "Submitted batch job 4242"
"""
FAKE_SACCT = """#!/bin/sh
# stands in for SLURM's sacct: every task of array job 4242 is still running
printf 'JobID|State|NodeList\\n4242_[0-3]|RUNNING|node1\\n'
"""


def test_slurm_submission_script_asks_for_the_resources_and_a_relaunch_does_not_submit_again(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    spec = _spec(tmp_path, "gpu_sweep", **TINY_LOOP, grid={"lam": [0.5, 1.0]}, seeds=[0, 1])
    journal = tmp_path / "journal"
    args = [spec, "--executor", "slurm", "--partition", "gpu", "--gpus", "1", "--time", "240", "--mem", "64G",
            "--parallel", "2", "--slurm", "account=myproj", "--no-wait"]
    out = _sweep(args, journal, path_prefix=bin_dir)
    assert out.returncode == 0, out.stderr
    scripts = sorted(bin_dir.glob("submitted_*.sh"))
    assert len(scripts) == 1  # one job array for the 4 points
    text = scripts[0].read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240", "#SBATCH --mem=64G",
                 "#SBATCH --account=myproj", "#SBATCH --array=0-3%2", "#SBATCH --job-name=shl-gpu_sweep"):
        assert line in text, line
    # the job runs submitit with this environment's python, which runs the point's notebook
    assert f"{sys.executable} -u -m submitit.core._submit" in text
    state = json.loads((journal / "sweeps/gpu_sweep/sweep.json").read_text())
    assert [p["job_id"] for p in state["points"]] == [f"4242_{i}" for i in range(4)]
    assert {p["state"] for p in state["points"]} == {"submitted"}
    assert all(p["log"].endswith(f"jobs/{p['job_id']}_0_log.out") for p in state["points"])

    again = _sweep(args, journal, path_prefix=bin_dir)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("is RUNNING") == 4 and "submitted lam" not in again.stdout
    assert len(list(bin_dir.glob("submitted_*.sh"))) == 1


def test_slurm_without_sbatch_stops_with_one_line(tmp_path):
    env = {**os.environ, "SHL_JOURNAL": str(tmp_path / "journal"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "shl.sweep", str(_spec(tmp_path, **TINY_LOOP, seeds=[0])),
                          "--executor", "slurm"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "error: --executor slurm needs sbatch and srun on PATH: launch from the cluster's login node"]
    assert not (tmp_path / "journal").exists()


# --- a 2x2 tiny sweep through the local executor, one point killed mid-run ----------------------

def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _round_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "] round " in line]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's processes in /proc")
def test_a_killed_point_resumes_on_relaunch_and_no_point_runs_twice(tmp_path):
    journal = tmp_path / "journal"
    spec = _spec(tmp_path, "tiny2x2", **TINY_LOOP, grid={"lam": [0.5, 1.0]}, seeds=[0, 1])
    env = {**os.environ, "SHL_JOURNAL": str(journal)}
    first = subprocess.Popen([sys.executable, "-m", "shl.sweep", str(spec)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_file = journal / "sweeps/tiny2x2/sweep.json"
    try:
        # the first point's job: kill it (its python and the notebook's kernel) once round 0 is logged
        log = _wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["points"][0].get("log"),
                        120, "the first point's job")
        job = json.loads(state_file.read_text())["points"][0]["job_id"]
        _wait_for(lambda: "round 0:" in (ROOT / log).read_text() if (ROOT / log).exists() else False, 300,
                  "round 0 of the first point")
        for pid in _descendants(int(job)):
            os.kill(pid, signal.SIGKILL)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1, err[-3000:]
    state = json.loads(state_file.read_text())
    killed = state["points"][0]
    assert killed["state"] == "failed" and killed["job_id"] == job, killed
    assert killed["error"].startswith("the job ended without a result") and "round 0:" in killed["error"]
    assert [p["state"] for p in state["points"][1:]] == ["finished"] * 3
    assert f"failed {killed['label']}" in out and "points not finished: launch again to resume" in out

    second = subprocess.run([sys.executable, "-m", "shl.sweep", str(spec)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skip ") == 3 and f"start {killed['label']}" in second.stdout
    assert f"[{killed['label']}] resuming" in second.stdout  # from its folder, after round 0

    # every round of every point ran exactly once over the two launches
    lines = _round_lines(out) + _round_lines(second.stdout)
    per_point = {}
    for line in lines:
        label, rest = line[1:].split("] ", 1)
        per_point.setdefault(label, []).append(int(rest.split()[1].rstrip(":")))
    assert {k: sorted(v) for k, v in per_point.items()} == {p["label"]: [0, 1] for p in state["points"]}
    state = json.loads(state_file.read_text())
    assert [p["state"] for p in state["points"]] == ["finished"] * 4
    assert state["points"][0]["launches"] == 2 and all(p["launches"] == 1 for p in state["points"][1:])

    table = (journal / "sweeps/tiny2x2/table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| lam=")]
    assert len(rows) == 4 and all("| finished | 2 |" in r for r in rows)
    assert ("| point | state | rounds done | seed | lam | d_trait | beyond null | off beyond null | coh x base | cost | verdict "
            "| all verdicts | seconds | run |") in table
    assert (journal / "sweeps/tiny2x2/pareto.png").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_repos_sweep_specs_are_valid(path, tmp_path, monkeypatch):
    monkeypatch.setattr("shl.journal.JOURNAL", tmp_path)  # plan names folders; it must make none
    points = sweep.plan(sweep.read_spec(path))
    assert points and len({p.run_dir for p in points}) == len(points)
    assert not list(tmp_path.iterdir())


def test_local_points_get_one_gpu_each_in_turn_and_none_on_a_cpu_machine():
    assert sweep.gpu_setup(0, []) == []
    gpus = ["2", "3"]  # e.g. CUDA_VISIBLE_DEVICES=2,3
    assert [sweep.gpu_setup(k, gpus) for k in range(3)] == [
        ["export CUDA_VISIBLE_DEVICES=2"], ["export CUDA_VISIBLE_DEVICES=3"], ["export CUDA_VISIBLE_DEVICES=2"]]
