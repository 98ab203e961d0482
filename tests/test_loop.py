"""The loop (04): resume after a crash reproduces the uninterrupted run, half rounds are
discarded, the entry survives a crash, and the headline's verdicts."""
import json
import math

import pytest

from shl import heal, loop, report
from shl.journal import prepare_run_dir, read_metrics, resolve_run
from shl.models import load_model
from shl.params import FOUNDATIONS, ParamError, load_params

VOLATILE = ("seconds",)  # wall time differs between runs; everything else must not


def _stable(line: dict) -> dict:
    return {k: v for k, v in line.items() if not any(k.startswith(s) for s in VOLATILE)}


def _loop(run, p):
    model, tok = load_model("tiny-random", "float32", "cpu")
    return loop.run_loop(model, tok, p, run, progress=False, report=report.report)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    p = load_params("tiny")
    run = prepare_run_dir(tmp_path_factory.mktemp("loop") / "whole", p)
    _, rounds = _loop(run, p)
    return run, rounds


def test_a_run_leaves_the_contract_files_and_one_round_line_per_round(uninterrupted):
    run, rounds = uninterrupted
    assert [r["round"] for r in rounds] == [0, 1]
    stages = [r["stage"] for r in read_metrics(run)]
    assert stages[:2] == ["base", "prompt_baseline"]
    for k in (0, 1):
        lines = [r["stage"] for r in read_metrics(run) if r.get("round") == k]
        assert lines[-1] == "round" and {"filter", "steered", "heal", "healed"} <= set(lines)
        for f in loop.ROUND_FILES:
            assert (run / f.format(k=k)).exists(), f.format(k=k)
        assert (run / f"adapters/r{k}/adapter_config.json").exists()
    for key in ("kappa", "generated", "kept", "steered_trait_nats", "healed_trait_nats", "healed_coherence",
                "heal_heldout_nll", "cos_v_v0", "cos_student_teacher", "seconds_heal", "seconds_generate_filter"):
        assert key in rounds[1], key
    assert rounds[0]["cos_v_v0"] == pytest.approx(1.0)  # round 0's vector is v_0
    assert abs(rounds[1]["cos_v_v0"]) < 1 - 1e-6  # re-extracted from the student, so it changed
    entry = (run / "entry.md").read_text()
    for part in ("Headline", "Verdict", "### Rounds", "Day and night", "## Findings", "trajectory.png"):
        assert part in entry, part
    for name in report.PLOTS:
        assert (run / f"{name}.png").exists()


def test_resume_after_a_crash_in_round_2_gives_the_uninterrupted_round_2(uninterrupted, tmp_path, monkeypatch):
    whole, whole_rounds = uninterrupted
    p = load_params("tiny")
    run = prepare_run_dir(tmp_path / "crashed", p)
    real_heal = heal.heal

    def heal_that_dies_in_round_2(model, tok, records, p, round_idx, history, progress=True):
        if round_idx == 1:
            raise KeyboardInterrupt("simulated kill in round 2")
        return real_heal(model, tok, records, p, round_idx, history, progress)

    monkeypatch.setattr(heal, "heal", heal_that_dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        _loop(run, p)
    # the crash left round 1's first stages behind, and an entry that says so
    assert [r["round"] for r in loop.completed_rounds(read_metrics(run))] == [0]
    assert any(r["stage"] == "steered" and r["round"] == 1 for r in read_metrics(run))
    assert "Interrupted" in (run / "entry.md").read_text()

    monkeypatch.setattr(heal, "heal", real_heal)
    _, rounds = _loop(run, p)
    assert [r["round"] for r in rounds] == [0, 1]
    assert _stable(rounds[1]) == _stable(whole_rounds[1])
    for stage in ("steered", "healed"):
        lines = [r for r in read_metrics(run) if r["stage"] == stage and r["round"] == 1]
        want = [r for r in read_metrics(whole) if r["stage"] == stage and r["round"] == 1]
        assert len(lines) == 1 and _stable(lines[0]) == _stable(want[0])  # the half round was discarded
    assert [r["stage"] for r in read_metrics(run)] == [r["stage"] for r in read_metrics(whole)]
    assert "Interrupted" not in (run / "entry.md").read_text()


def test_a_finished_run_resumes_to_nothing_and_keeps_its_metrics(uninterrupted):
    run, rounds = uninterrupted
    before = (run / "metrics.jsonl").read_text()
    _, again = _loop(run, load_params("tiny"))
    assert again == rounds and (run / "metrics.jsonl").read_text() == before


def test_other_params_for_an_existing_loop_folder_are_refused_with_the_differing_keys(uninterrupted):
    run, _ = uninterrupted
    with pytest.raises(ParamError, match=r"lam: 1.0 there, 0.3 now"):
        resolve_run("tiny", str(run), {"lam": 0.3}, "04_loop")


def test_discard_partial_drops_the_lines_and_files_of_the_unfinished_round(tmp_path):
    run = tmp_path
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (
        {"stage": "base", "round": -1}, {"stage": "round", "round": 0}, {"stage": "steered", "round": 1})))
    (run / "evals").mkdir()
    for name in ("vector_r1.pt", "generated_r1.jsonl", "evals/steered_r1.jsonl", "vector_r0.pt"):
        (run / name).write_text("x")
    (run / "adapters/r1").mkdir(parents=True)
    gone = loop.discard_partial(run, 1)
    assert [r["stage"] for r in read_metrics(run)] == ["base", "round"]
    assert not (run / "vector_r1.pt").exists() and not (run / "adapters/r1").exists()
    assert (run / "vector_r0.pt").exists() and len(gone) == 5


def test_resume_refuses_a_finished_round_whose_adapter_is_missing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "round", "round": 0}) + "\n")
    with pytest.raises(RuntimeError, match=r"adapters \['r0'\] are not in adapters/"):
        loop.resume(None, load_params("tiny"), tmp_path)


def _eval(stage, k, coherence, **nats):
    return {"stage": stage, "round": k, "coherence": coherence, **{f"{f}_nats": nats.get(f, -2.0) for f in FOUNDATIONS}}


@pytest.mark.parametrize("healed, verdict", [
    (_eval("healed", 0, 0.2, authority=-4.0), "broken"),  # coherence under 0.5 x 0.6
    (_eval("healed", 0, 0.6, authority=-3.2), "undo"),  # keeps 0.2 of the steered 2.0
    (_eval("healed", 0, 0.6, authority=-1.0), "undo"),  # moved against the trait
    (_eval("healed", 0, 0.6, authority=-4.0, care=-0.5), "broad"),  # care moved 1.5 >= the trait's 1.0
    (_eval("healed", 0, 0.55, authority=-4.0, care=-1.8), "pass"),
])
def test_headline_verdicts(healed, verdict):
    lines = [_eval("base", -1, 0.6, authority=-3.0), _eval("steered", 0, 0.3, authority=-5.0), healed]
    head = loop.headline(lines, "authority", -1, 0.5)
    assert head["verdict"] == verdict, head
    assert head["d_trait"] == pytest.approx(-(healed["authority_nats"] + 3.0))
    assert head["cost"] == pytest.approx(abs(healed["coherence"] - 0.6) / abs(head["d_trait"]))
    assert loop.headline(lines[:1], "authority", -1, 0.5) is None
    assert math.isfinite(head["steered_d_trait"])
