"""The loop (04): resume after a crash reproduces the uninterrupted run, half rounds are
discarded, the entry survives a crash, and the headline's verdicts."""
import json

import pytest
import torch

from shl import heal, loop, null, report
from shl.journal import prepare_run_dir, read_metrics, resolve_run
from shl.models import load_model
from shl.params import FOUNDATIONS, STEER_METHODS, ParamError, load_params

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


def test_the_null_arm_runs_once_in_round_0_on_its_prompts_and_count(uninterrupted):
    run, rounds = uninterrupted
    lines = read_metrics(run)
    assert [(r["stage"], r["round"]) for r in lines if r["stage"] in ("null", "null_heal")] == [("null_heal", 0), ("null", 0)]
    nul = next(r for r in lines if r["stage"] == "null")
    kept0 = [r for r in loop.read_jsonl(run / "generated_r0.jsonl") if r["kept"]]
    null_kept = [r for r in loop.read_jsonl(run / "generated_null.jsonl") if r["kept"]]
    assert nul["n_train"] == len(kept0) and sorted(r["prompt"] for r in null_kept) == sorted(r["prompt"] for r in kept0)
    assert all(r["coeff"] == 0.0 for r in null_kept)  # steering off
    assert (run / "adapters/null/adapter_config.json").exists()
    for f in loop.NULL_FILES:
        assert (run / f).exists(), f
    assert rounds[1]["healed_d_trait_beyond_null"] == pytest.approx(rounds[1]["healed_d_trait"] - rounds[1]["null_d_trait"])
    assert rounds[0]["seconds_null"] > 0 and rounds[1].get("seconds_null", 0.0) == 0.0


def _die_in_heal(monkeypatch):
    real = heal.heal

    def heal_that_dies_in_round_2(model, tok, records, p, round_idx, history, progress=True, name=""):
        if round_idx == 1:
            raise KeyboardInterrupt("simulated kill in round 2")
        return real(model, tok, records, p, round_idx, history, progress, name)
    monkeypatch.setattr(heal, "heal", heal_that_dies_in_round_2)


def _die_in_the_null_arm(monkeypatch):
    real = loop.evaluate

    def dies(model, tok, system=None, **kw):
        if "null" in (getattr(model, "active_adapters", None) or []):
            raise KeyboardInterrupt("simulated kill in the null arm's eval (round 0)")
        return real(model, tok, system=system, **kw)
    monkeypatch.setattr(null, "evaluate", dies)


def _die_after_the_adapter_is_saved(monkeypatch):
    real = loop.round_student_vector

    def dies(model, tok, contexts, layers, before, after, *args):
        if len(before) == 1:  # round 2: heal line, adapter, heal plot, healed eval and demos are written
            raise KeyboardInterrupt("simulated kill in round 2, after its adapter was saved")
        return real(model, tok, contexts, layers, before, after, *args)
    monkeypatch.setattr(loop, "round_student_vector", dies)


def _die_in_the_prompting_baseline(monkeypatch):
    real = loop.evaluate

    def dies(model, tok, system=None, **kw):
        if system is not None:
            raise KeyboardInterrupt("simulated kill in the once-per-run evals")
        return real(model, tok, system=system, **kw)
    monkeypatch.setattr(loop, "evaluate", dies)


@pytest.mark.parametrize("crash", [_die_in_heal, _die_after_the_adapter_is_saved, _die_in_the_prompting_baseline,
                                   _die_in_the_null_arm],
                         ids=["in-heal", "after-adapter-saved", "in-once-per-run", "in-null-arm"])
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


def test_round_student_vector_reads_each_adapter_stack_once_across_rounds(tiny, monkeypatch):
    """Round k's student (history + r{k}) is round k+1's reference: its states are read once."""
    import copy
    from conftest import randomize_lora
    from shl import history, steer
    p = load_params("tiny")
    model = history.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
    randomize_lora(model, "r0", seed=1)
    model = history.add_round_adapter(model, p, 1)
    randomize_lora(model, "r1", seed=2)
    calls = []
    real = steer.last_token_states
    monkeypatch.setattr(steer, "last_token_states", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    states = {}
    v0 = loop.round_student_vector(model, tiny[1], ["Hi", "Plan a picnic"], [0, 1], [], ["r0"], 2, False, states)
    v1 = loop.round_student_vector(model, tiny[1], ["Hi", "Plan a picnic"], [0, 1], ["r0"], ["r0", "r1"], 2, False, states)
    assert calls == ["student base", "student r0", "student r0+r1"]  # r0's states serve both rounds
    fresh = loop.round_student_vector(model, tiny[1], ["Hi", "Plan a picnic"], [0, 1], ["r0"], ["r0", "r1"], 2, False)
    for l in (0, 1):
        assert v0.layers[l].abs().max() > 1e-4
        torch.testing.assert_close(v1.layers[l], fresh.layers[l])


@pytest.mark.parametrize("healed, verdicts", [
    (_eval("healed", 0, 0.2, authority=-4.0), ["broken"]),  # coherence under 0.5 x 0.6
    (_eval("healed", 0, 0.6, authority=-3.2), ["undo"]),  # keeps 0.2 of the steered 2.0
    (_eval("healed", 0, 0.6, authority=-1.0), ["undo"]),  # moved against the trait
    (_eval("healed", 0, 0.6, authority=-4.0, care=-0.5), ["broad"]),  # care moved 1.5 >= the trait's 1.0
    (_eval("healed", 0, 0.6, authority=-3.2, care=-0.5), ["undo", "broad"]),  # both apply: both named
    (_eval("healed", 0, 0.2, authority=-3.2, care=-0.5), ["broken", "undo", "broad"]),
    (_eval("healed", 0, 0.55, authority=-4.0, care=-1.8), []),
])
def test_headline_verdicts(healed, verdicts):
    lines = [_eval("base", -1, 0.6, authority=-3.0), _eval("steered", 0, 0.3, authority=-5.0), healed]
    head = loop.headline(lines, "authority", -1, 0.5)
    assert head["verdicts"] == verdicts, head
    assert head["verdict"] == (verdicts[0] if verdicts else "pass")
    assert head["broad_basis"] == "raw (no null arm)"
    assert head["d_trait"] == pytest.approx(-(healed["authority_nats"] + 3.0))
    assert head["cost"] == pytest.approx(abs(healed["coherence"] - 0.6) / abs(head["d_trait"]))
    assert loop.headline(lines[:1], "authority", -1, 0.5) is None
    assert head["steered_d_trait"] == pytest.approx(2.0)


def test_headline_reads_trait_and_broad_beyond_the_null_arm():
    """Fine-tuning drift (the null arm) moved care -1.5 and authority -0.3: the healed model's care
    move of -1.5 is all drift (not broad), and the trait beyond the null is 1.0 - 0.3 = 0.7."""
    base = _eval("base", -1, 0.6, authority=-3.0)
    steered = _eval("steered", 0, 0.3, authority=-5.0)
    healed = _eval("healed", 0, 0.6, authority=-4.0, care=-3.5)
    nul = _eval("null", 0, 0.62, authority=-3.3, care=-3.5)
    raw = loop.headline([base, steered, healed], "authority", -1, 0.5)
    head = loop.headline([base, steered, nul, healed], "authority", -1, 0.5)
    assert raw["verdicts"] == ["broad"] and raw["off_target"] == "care"
    assert head["verdicts"] == [] and head["broad_basis"] == "beyond null"
    assert head["null_d_trait"] == pytest.approx(0.3) and head["d_trait_beyond_null"] == pytest.approx(0.7)
    assert head["off_target_move"] == pytest.approx(1.5) and head["off_target_beyond_null_move"] == pytest.approx(0.0)
    # a foundation the heal moved beyond the drift does count
    healed2 = _eval("healed", 0, 0.6, authority=-4.0, care=-3.5, fairness=-1.0)
    assert loop.headline([base, steered, nul, healed2], "authority", -1, 0.5)["verdicts"] == ["broad"]


def test_headline_reports_the_probe_move_against_base_and_the_null_and_the_instrument_warning():
    from shl import report
    base = dict(_eval("base", -1, 0.6, authority=-3.0), trait_probe_gap=0.5, read_js=0.001, rank_human_dev=0.0,
                n_argmax=1, top1_acc=0.1, top1_const=0.15)
    steered = dict(_eval("steered", 0, 0.3, authority=-5.0), trait_probe_gap=2.5)
    healed = dict(_eval("healed", 0, 0.6, authority=-4.0), trait_probe_gap=1.5)
    nul = dict(_eval("null", 0, 0.62, authority=-3.3), trait_probe_gap=0.8)
    head = loop.headline([base, steered, nul, healed], "authority", -1, 0.5)
    assert head["probe_d"] == pytest.approx(1.0) and head["probe_steered_d"] == pytest.approx(2.0)
    assert head["probe_null_d"] == pytest.approx(0.3) and head["probe_d_beyond_null"] == pytest.approx(0.7)
    assert head["instrument_warning"].startswith("warning: the model barely reads")
    text = report.headline_text(head)
    assert "healed +1.000 nats, steered +2.000, null arm +0.300, beyond the null +0.700" in text
    assert "**Instrument:** warning" in text
    # without a null arm the null clause goes; eval lines older than the probe give nan and no sentence
    no_null = report.headline_text(loop.headline([base, steered, healed], "authority", -1, 0.5))
    assert "steered +2.000." in no_null and "null arm" not in no_null.split("Trait probe")[1]
    old = loop.headline([_eval("base", -1, 0.6, authority=-3.0), steered, healed], "authority", -1, 0.5)
    assert old["probe_d"] != old["probe_d"] and old["instrument_warning"] == ""
    assert "Trait probe" not in report.headline_text(old) and "Instrument" not in report.headline_text(old)


def test_headline_ignores_the_healed_eval_of_an_unfinished_round():
    lines = [_eval("base", -1, 0.6, authority=-3.0), _eval("steered", 0, 0.3, authority=-5.0),
             _eval("healed", 0, 0.55, authority=-4.0, care=-1.8), {"stage": "round", "round": 0},
             _eval("steered", 1, 0.2, authority=-6.0), _eval("healed", 1, 0.1, authority=-2.0)]
    assert loop.headline(lines, "authority", -1, 0.5)["round"] == 0


@pytest.mark.parametrize("method", [m for m in STEER_METHODS if m != load_params("tiny").steer_method])
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
