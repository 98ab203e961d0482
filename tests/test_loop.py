"""The loop (04): resume after a crash reproduces the uninterrupted run, half rounds are
discarded, the entry survives a crash, and the headline's verdicts."""
import json

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


def _die_in_heal(monkeypatch):
    real = heal.heal

    def heal_that_dies_in_round_2(model, tok, records, p, round_idx, history, progress=True):
        if round_idx == 1:
            raise KeyboardInterrupt("simulated kill in round 2")
        return real(model, tok, records, p, round_idx, history, progress)
    monkeypatch.setattr(heal, "heal", heal_that_dies_in_round_2)


def _die_after_the_adapter_is_saved(monkeypatch):
    real = loop.round_student_vector

    def dies(model, tok, contexts, layers, before, after, batch_size, progress):
        if len(before) == 1:  # round 2: heal line, adapter, heal plot, healed eval and demos are written
            raise KeyboardInterrupt("simulated kill in round 2, after its adapter was saved")
        return real(model, tok, contexts, layers, before, after, batch_size, progress)
    monkeypatch.setattr(loop, "round_student_vector", dies)


def _die_in_the_prompting_baseline(monkeypatch):
    real = loop.evaluate

    def dies(model, tok, system=None, **kw):
        if system is not None:
            raise KeyboardInterrupt("simulated kill in the once-per-run evals")
        return real(model, tok, system=system, **kw)
    monkeypatch.setattr(loop, "evaluate", dies)


@pytest.mark.parametrize("crash", [_die_in_heal, _die_after_the_adapter_is_saved, _die_in_the_prompting_baseline],
                         ids=["in-heal", "after-adapter-saved", "in-once-per-run"])
def test_resume_after_a_crash_gives_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch, crash):
    whole, whole_rounds = uninterrupted
    p = load_params("tiny")
    run = prepare_run_dir(tmp_path / "crashed", p)
    with monkeypatch.context() as m:
        crash(m)
        with pytest.raises(KeyboardInterrupt):
            _loop(run, p)
    # the crash left a half-finished stage behind, and an entry that says so
    assert "Interrupted" in (run / "entry.md").read_text()
    if crash is _die_after_the_adapter_is_saved:
        assert (run / "adapters/r1/adapter_config.json").exists() and (run / "heal_r1.png").exists()
        assert [r["round"] for r in loop.completed_rounds(read_metrics(run))] == [0]

    _, rounds = _loop(run, p)
    assert [r["round"] for r in rounds] == [0, 1]
    assert [_stable(r) for r in rounds] == [_stable(r) for r in whole_rounds]
    got, want = read_metrics(run), read_metrics(whole)
    assert [(r["stage"], r["round"]) for r in got] == [(r["stage"], r["round"]) for r in want]  # nothing doubled
    assert [_stable(r) for r in got] == [_stable(r) for r in want]
    assert "Interrupted" not in (run / "entry.md").read_text()
    assert not (run / ".lock").exists()


def test_resume_refuses_a_model_that_still_carries_a_crashed_rounds_adapter(tmp_path, monkeypatch):
    p = load_params("tiny")
    run = prepare_run_dir(tmp_path / "crashed", p)
    model, tok = load_model("tiny-random", "float32", "cpu")
    with monkeypatch.context() as m:
        _die_after_the_adapter_is_saved(m)
        m.setattr(loop, "round_student_vector", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            loop.run_loop(model, tok, p, run, progress=False)
    # heal wrapped `model` in place: r0 sits in it, never saved as a finished round
    with pytest.raises(RuntimeError, match="already carries LoRA adapters"):
        loop.run_loop(model, tok, p, run, progress=False)


def test_the_loop_stops_at_the_coherence_floor_and_a_resume_does_not_go_on(tmp_path, monkeypatch):
    p = load_params("tiny", coh_floor=0.5)
    run = prepare_run_dir(tmp_path / "stops", p)
    real = loop.log_eval

    def collapsing(run_dir, result, stage, round=-1, **extra):
        if stage == "healed":
            result.summary["coherence"] *= 0.1
        return real(run_dir, result, stage, round, **extra)
    monkeypatch.setattr(loop, "log_eval", collapsing)
    _, rounds = _loop(run, p)
    assert [r["round"] for r in rounds] == [0] and rounds[0]["stopped"]
    assert "coh_floor 0.5" in rounds[0]["stop_reason"]
    entry = (run / "entry.md").read_text()
    assert "**Stopped** after round 0" in entry and "Verdict: broken" in entry
    _, again = _loop(run, p)
    assert again == rounds


def test_a_second_loop_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    import os
    run = prepare_run_dir(tmp_path / "busy", load_params("tiny"))
    (run / ".lock").write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(RuntimeError, match="in use by process"):
        loop.run_loop(None, None, load_params("tiny"), run)
    (run / ".lock").write_text("999999999")  # a dead one: its lock is taken over
    with loop.run_lock(run):
        assert (run / ".lock").read_text() == str(os.getpid())
    assert not (run / ".lock").exists()


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
    assert head["steered_d_trait"] == pytest.approx(2.0)


def test_headline_ignores_the_healed_eval_of_an_unfinished_round():
    lines = [_eval("base", -1, 0.6, authority=-3.0), _eval("steered", 0, 0.3, authority=-5.0),
             _eval("healed", 0, 0.55, authority=-4.0, care=-1.8), {"stage": "round", "round": 0},
             _eval("steered", 1, 0.2, authority=-6.0), _eval("healed", 1, 0.1, authority=-2.0)]
    assert loop.headline(lines, "authority", -1, 0.5)["round"] == 0


@pytest.mark.parametrize("method", ["pca", "lda"])
def test_the_loop_runs_two_rounds_with_another_steer_method(tmp_path, method):
    p = load_params("tiny", steer_method=method)
    run = prepare_run_dir(tmp_path / method, p)
    _, rounds = _loop(run, p)
    assert [r["round"] for r in rounds] == [0, 1]
    from shl.steer import Vector
    assert [Vector.load(run / f"vector_r{k}.pt").meta["method"] for k in (0, 1)] == [method, method]
    entry = (run / "entry.md").read_text()
    assert "### Selectivity per round" in entry and "healed on" in entry
    for k in ("cos_v_v0", "cos_student_teacher"):
        assert -1.0 <= rounds[1][k] <= 1.0


def test_the_entry_carries_the_healed_models_selectivity_against_base(uninterrupted):
    run, _ = uninterrupted
    from shl.selectivity import round_selectivity
    got = round_selectivity(run, "authority", -1, 1)
    entry = (run / "entry.md").read_text()
    assert f"healed on {got['healed_on']:+.3f}, off {got['healed_off']:.3f}, selectivity {got['healed_selectivity']:+.3f}" in entry
