import json
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml

from shl import index as I
from shl.params import FOUNDATIONS, load_params

GOOD = "2026-01-02_04_loop_tiny-random"
TRUNC = "2026-01-02_04_loop_tiny-random_truncated"
NO_METRICS = "2026-01-02_01_vector_tiny-random"
OLD_KEY = "2026-01-02_03_heal_tiny-random"
LAM = "2026-01-02_04_loop_tiny-random_lam0.5"
BAD_YAML = "2026-01-03_07_new_thing_qwen3-4b"


def _eval(stage, k, authority, coherence):
    # the tiny preset's demo is authority with trait_sign -1: the trait grows as authority_nats falls
    return {"stage": stage, "round": k, "coherence": coherence,
            **{f"{f}_nats": (authority if f == "authority" else -2.0) for f in FOUNDATIONS}}


def _loop_lines(n_rounds=2):
    """base authority -5 at coherence 0.8; round k steers to -6-k and heals to -5.5-0.5k at 0.7.
    Last round (1): d_trait = +1.0 of a steered +2.0, d_coh = -0.1, cost 0.1, verdict pass."""
    lines = [_eval("base", -1, -5.0, 0.8), _eval("prompt_baseline", -1, -5.2, 0.8)]
    for k in range(n_rounds):
        healed = -5.5 - 0.5 * k
        lines += [_eval("steered", k, -6.0 - k, 0.6), _eval("healed", k, healed, 0.7),
                  {"stage": "round", "round": k, "healed_d_trait": -(healed + 5.0), "healed_coh_ratio": 0.7 / 0.8,
                   "stopped": False}]
    return lines


def _eval_rows(line, n=3):
    """Per-vignette rows whose answer log-probs are the line's nats (the same on every vignette)."""
    nats = np.array([line[f"{f}_nats"] for f in FOUNDATIONS])
    p = np.exp(nats) / np.exp(nats).sum()
    return [{"id": i, **{f"p_{f}": float(x) for f, x in zip(FOUNDATIONS, p)}} for i in range(n)]


def _write(run, params=None, lines=None, tail=""):
    run.mkdir(parents=True)
    if params is not None:
        (run / "params.yaml").write_text(params if isinstance(params, str) else yaml.safe_dump(params))
    if lines is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
        (run / "evals").mkdir()
        for r in lines:  # what log_eval leaves beside each eval line
            if r["stage"] in ("base", "steered", "healed"):
                (run / "evals" / f"{r['stage']}_r{r['round']}.jsonl").write_text(
                    "".join(json.dumps(x) + "\n" for x in _eval_rows(r)))


@pytest.fixture
def journal(tmp_path):
    j = tmp_path / "journal"
    tiny = load_params("tiny").to_dict()
    _write(j / GOOD, tiny, _loop_lines())
    (j / GOOD / "04_loop.ipynb").write_text("{}")
    _write(j / TRUNC, tiny, _loop_lines(1), tail='{"stage": "steered", "round": 1, "coher')
    _write(j / NO_METRICS, tiny)
    _write(j / OLD_KEY, {**tiny, "old_knob": 3}, _loop_lines(1)[:4])
    _write(j / LAM, {**tiny, "lam": 0.5}, _loop_lines())
    _write(j / BAD_YAML, "model: [unclosed\n", [])
    (j / ".hidden").mkdir()
    (j / ".hidden" / "params.yaml").write_text("x: 1\n")
    (j / "not_a_run").mkdir()
    (j / "README.md").write_text("# journal\n")
    return j


def _rows(journal):
    return {r["run"]: r for r in I.scan(journal)}


def test_scan_has_one_row_per_run_folder_and_skips_the_rest(journal):
    assert list(_rows(journal)) == sorted([GOOD, TRUNC, NO_METRICS, OLD_KEY, LAM, BAD_YAML])


def test_good_run_headline_matches_the_crafted_numbers(journal):
    r = _rows(journal)[GOOD]
    assert (r["status"], r["notebook"], r["rounds"], r["verdict"]) == ("ok", "04_loop", 2, "pass")
    assert r["d_trait"] == pytest.approx(1.0) and r["d_coh"] == pytest.approx(-0.1)
    assert r["cost"] == pytest.approx(0.1) and r["base_coherence"] == pytest.approx(0.8)
    assert r["headline"]["round"] == 1
    # centred log-probs: authority fell 1 nat alone, so on = 6/7, off = 1/7
    assert r["healed_on"] == pytest.approx(6 / 7) and r["healed_off"] == pytest.approx(1 / 7)
    assert r["healed_selectivity"] == pytest.approx(6 / 7 - 0.1 / 7)


def test_a_loop_run_without_its_eval_rows_says_so_and_keeps_its_headline(journal):
    import shutil
    shutil.rmtree(journal / LAM / "evals")
    r = _rows(journal)[LAM]
    assert r["status"].startswith("selectivity failed: FileNotFoundError") and r["verdict"] == "pass"
    assert r["healed_on"] is None


def test_each_problem_is_reported_in_its_row(journal):
    rows = _rows(journal)
    assert rows[TRUNC]["status"] == "metrics.jsonl line 6 is not JSON (truncated?); read 5 lines; unfinished: 1 of 2 rounds"
    assert rows[TRUNC]["rounds"] == 1 and rows[TRUNC]["verdict"] == "pass"  # the lines before it count
    assert rows[NO_METRICS]["status"] == "no metrics.jsonl"
    assert rows[OLD_KEY]["status"].startswith("params.yaml rejected by the current code: unknown parameter 'old_knob'")
    assert rows[OLD_KEY]["d_trait"] == pytest.approx(0.5)  # read raw over the defaults: the demo still resolves
    assert rows[BAD_YAML]["status"].startswith("params.yaml unreadable:")
    assert rows[BAD_YAML]["notebook"] == "07_new_thing"  # from the folder name: no such notebook in the repo
    assert rows[NO_METRICS]["notebook"] == "01_vector"


def test_differing_params_are_only_those_that_differ(journal):
    rows = _rows(journal)
    assert set(rows[GOOD]["params"]) == {"lam", "old_knob"}
    assert (rows[GOOD]["params"]["lam"], rows[LAM]["params"]["lam"]) == (1.0, 0.5)
    assert rows[OLD_KEY]["params"]["old_knob"] == 3 and rows[GOOD]["params"]["old_knob"] is None
    assert rows[BAD_YAML]["params"] == {}


def test_write_index_lists_every_folder_with_its_problem(journal):
    path = I.write_index(journal)
    assert path == journal / "index.md"
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert "lam" in cols and "model" not in cols and "seed" not in cols
    for run in (GOOD, TRUNC, NO_METRICS, OLD_KEY, LAM, BAD_YAML):
        assert f"| {run} |" in text
    problems = text[text.index("## Problems"):]
    assert f"`{TRUNC}`: metrics.jsonl line 6 is not JSON" in problems and f"`{GOOD}`" not in problems
    good = next(line for line in text.splitlines() if line.startswith(f"| {GOOD} |"))
    assert "| pass |" in good and "| 1.000 |" in good and good.endswith("| 0.857 | 0.143 | 0.843 |")


def test_plot_overlay_draws_one_line_per_loop_run(journal, tmp_path, capsys):
    runs = [journal / name for name in (GOOD, TRUNC, NO_METRICS, LAM, BAD_YAML)]
    out = tmp_path / "overlay.png"
    fig = I.plot_overlay(runs, out)
    top, bottom = fig.axes
    labels = [line.get_label() for line in top.get_lines() if not line.get_label().startswith("_")]
    assert labels == [GOOD, TRUNC, LAM]
    assert len([line for line in bottom.get_lines() if not line.get_label().startswith("_")]) == 3
    good = top.get_lines()[0]
    assert list(good.get_xdata()) == [-1, 0, 1] and list(good.get_ydata()) == pytest.approx([0.0, 0.5, 1.0])
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out
    assert f"skipping {NO_METRICS}" in printed and f"skipping {BAD_YAML}" in printed
    plt.close(fig)
    with pytest.raises(ValueError, match="none of the runs has round lines"):
        I.plot_overlay([journal / NO_METRICS])


def test_cli_writes_the_index_and_the_overlay(journal):
    done = subprocess.run([sys.executable, "-m", "shl.index", "--journal", str(journal), "--plot-all"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == str(journal / "index.md") and out[-1] == str(journal / "index_overlay.png")
    assert f"| {GOOD} |" in done.stdout and (journal / "index_overlay.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="^error: no journal folder"):  # in-process: no second torch import
        I.main(["--journal", str(journal / "nope")])
