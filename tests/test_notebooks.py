"""The notebooks: jupytext pairs in sync, output-free templates, and they run under papermill."""
import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_and_each_has_its_py_pair():
    assert NOTEBOOKS
    for nb in NOTEBOOKS:
        assert nb.with_suffix(".py").exists(), nb


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_py_and_ipynb_pair_are_in_sync(nb):
    rendered = jupytext.writes(jupytext.read(nb), fmt="py:percent")
    assert rendered == nb.with_suffix(".py").read_text(), f"run `jupytext --sync {nb.with_suffix('.py')}`"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_templates_carry_no_outputs_and_one_parameters_cell(nb):
    book = nbformat.read(nb, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "params =" in tagged[0].source and "run_dir =" in tagged[0].source
    assert book.metadata.kernelspec.name == "shl"


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "shl.run", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_01_vector_runs_under_papermill_on_tiny_and_leaves_the_contract_files(tmp_path):
    run = tmp_path / "run"
    out = _run(["notebooks/01_vector.ipynb", "--params", "tiny", "--run-dir", str(run)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("params.yaml", "metrics.jsonl", "01_vector.ipynb", "profile_base.png", "sweep.png",
                 "vector_r0.pt", "samples_sweep.jsonl", "entry.md", "selectivity.png",
                 "vector_mean_diff.pt", "vector_pca.pt", "vector_lda.pt", "evals/method_lda_kl0.01_neg.jsonl"):
        assert (run / name).exists(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # tiny sweeps -1 and +1, then 3 methods x 2 KL budgets x 2 signs, then a selectivity line per method and budget
    assert [r["stage"] for r in lines] == ["base", "prompt_baseline"] + ["sweep"] * 2 + ["method"] * 12 + ["selectivity"] * 6
    assert [r["coeff"] for r in lines[2:4]] == [-1.0, 1.0]
    methods = [r for r in lines if r["stage"] == "method"]
    assert [(r["method"], r["kl_budget"], r["sign"]) for r in methods[:4]] == [
        ("mean_diff", 0.005, 1), ("mean_diff", 0.005, -1), ("mean_diff", 0.01, 1), ("mean_diff", 0.01, -1)]
    assert all(r["coeff"] == -q["coeff"] for r, q in zip(methods[::2], methods[1::2]))
    sel = [r for r in lines if r["stage"] == "selectivity"]
    assert {(r["method"], r["kl_budget"]) for r in sel} == {(m, b) for m in ("mean_diff", "pca", "lda") for b in (0.005, 0.01)}
    for r in sel:
        assert r["selectivity"] == pytest.approx(r["on"] - 0.1 * r["off"])
        assert r["selectivity_lo"] <= r["selectivity"] <= r["selectivity_hi"]
        assert {"d_sel", "care_move", "sel_companions", "coh_pos", "coh_neg", "kl_p95_neg"} <= set(r)
    # on = half the -coeff -> +coeff move of the trait's centred log-prob, from the rows the lines point to
    from shl import selectivity
    from shl.journal import read_jsonl
    pca = next(r for r in sel if (r["method"], r["kl_budget"]) == ("pca", 0.01))
    d = selectivity.delta(*(read_jsonl(run / f"evals/method_pca_kl0.01_{s}.jsonl") for s in ("neg", "pos")))
    assert pca["on"] == pytest.approx(-d[:, 3].mean() / 2)  # authority (column 3) down is the trait
    entry = (run / "entry.md").read_text()
    assert "Verdict (gate 1)" in entry and "Steering methods at a matched dose" in entry and "**Methods:**" in entry


def test_a_mistyped_parameter_stops_before_any_model_loads(tmp_path):
    out = _run(["notebooks/01_vector.ipynb", "--params", "tiny", "--run-dir", str(tmp_path / "r"), "-p", "lamb", "0.3"])
    assert out.returncode != 0
    assert "unknown parameter 'lamb' (did you mean lam?)" in out.stderr
    assert not (tmp_path / "r").exists()


def test_plain_papermill_refuses_an_undeclared_parameter_inside_the_notebook(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="unknown parameter 'epoch'"):
        pm.execute_notebook(str(ROOT / "notebooks/01_vector.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"params": "tiny", "run_dir": str(tmp_path / "r"), "epoch": 3},
                            kernel_name="shl", progress_bar=False)


def test_02_generate_filter_runs_under_papermill_on_tiny(tmp_path):
    run = tmp_path / "run"
    out = _run(["notebooks/02_generate_filter.ipynb", "--params", "tiny", "--run-dir", str(run)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("params.yaml", "metrics.jsonl", "02_generate_filter.ipynb", "filter_ppl_vs_dose.png", "walk_c.png",
                 "kept.jsonl", "generated.jsonl", "walk_c_trace.jsonl", "walk_c_survival.txt", "entry.md"):
        assert (run / name).exists(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(r["stage"] == "filter" for r in lines)
    assert {"kappa", "generated", "kept", "drop_ppl", "drop_repetition", "drop_narration", "drop_refusal"} <= set(lines[0])
    kept = [json.loads(line) for line in (run / "kept.jsonl").read_text().splitlines()]
    assert len(kept) >= 2 and all(r["kept"] for r in kept)


def test_03_heal_runs_under_papermill_on_tiny_with_the_ablation(tmp_path):
    run = tmp_path / "run"
    out = _run(["notebooks/03_heal.ipynb", "--params", "tiny", "--run-dir", str(run), "-p", "heal_ablation", "true"],
               timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("params.yaml", "metrics.jsonl", "03_heal.ipynb", "heal_r0.png", "heal_log.jsonl", "kept.jsonl",
                 "adapters/r0/adapter_config.json", "adapters/r0/adapter_model.safetensors", "entry.md"):
        assert (run / name).exists(), name
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["base", "prompt_baseline", "steered", "heal", "healed", "filter", "null_heal", "null",
                      "ablation_nll", "ablation_kl_rev"]
    assert (run / "generated_null.jsonl").exists() and "beyond the null arm" in (run / "entry.md").read_text()
    heal_line = json.loads((run / "metrics.jsonl").read_text().splitlines()[3])
    assert {"train_nll", "heldout_nll", "final_D", "seconds"} <= set(heal_line)
    assert "Verdict (gate 3)" in (run / "entry.md").read_text()


def test_04_loop_runs_two_rounds_under_papermill_on_tiny_and_writes_the_index(tmp_path):
    run = tmp_path / "journal" / "loop"
    # streamed: the round lines reach this process's stdout while the notebook still runs
    proc = subprocess.Popen([sys.executable, "-m", "shl.run", "notebooks/04_loop.ipynb", "--params", "tiny",
                             "--run-dir", str(run), "-p", "eval_n", "7"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen_live = []
    try:
        for line in proc.stdout:
            if line.startswith("round 0:"):
                seen_live.append(proc.poll() is None)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert seen_live == [True], "no round line on stdout before the process ended"
    assert "mfv eval" in err and "heal r1" in err  # the stage bars reach the terminal too
    # no warnings in a normal run: the kernel's TCP note, tqdm's ipywidgets note, papermill's
    # "unknown parameter" for a knob the notebook takes by name
    assert not [x for x in err.splitlines() if "warn" in x.lower()], err[-3000:]
    book = nbformat.read(run / "04_loop.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert "round 0:" in printed and "round 1:" in printed  # the executed notebook keeps its outputs
    for name in ("params.yaml", "metrics.jsonl", "04_loop.ipynb", "entry.md", "trajectory.png", "pareto.png",
                 "plane.png", "filter_rounds.png", "demos_base.jsonl", "adapters/r1/adapter_config.json"):
        assert (run / name).exists(), name
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"stage": "round"' in x]
    assert [r["round"] for r in rounds] == [0, 1]
    index = (tmp_path / "journal" / "index.md").read_text()
    assert "| loop | 04_loop | ok | 2 |" in index
    assert (tmp_path / "journal" / "index_overlay.png").exists()
