"""Selectivity on synthetic eval rows: the numbers the definition gives, the bootstrap intervals,
and the loop run's healed-vs-base figures read from its folder."""
import json

import numpy as np
import pytest

from shl import selectivity as S
from shl.params import FOUNDATIONS

A = FOUNDATIONS.index("authority")


def _rows(logps, ids=None):
    """Eval rows (`p_<f>` = softmax of each row's option log-probs [N, 7])."""
    logps = np.asarray(logps, dtype=float)
    p = np.exp(logps - logps.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = ids or list(range(len(logps)))
    return [{"id": i, **{f"p_{f}": float(p[n, j]) for j, f in enumerate(FOUNDATIONS)}} for n, i in enumerate(ids)]


def _base(n=12, seed=0):
    return np.random.default_rng(seed).normal(-2.0, 1.0, size=(n, 7))


def test_a_move_of_the_trait_answer_alone_reads_six_sevenths_on_and_a_seventh_off():
    base = _base()
    moved = base.copy()
    moved[:, A] -= 0.7  # authority's log-prob falls 0.7 nats on every vignette, nothing else changes
    d = S.delta(_rows(base), _rows(moved))
    got = S.score(d, {"authority": -1})
    assert got["on"] == pytest.approx(0.6)
    assert got["off"] == pytest.approx(0.1)
    assert got["selectivity"] == pytest.approx(0.6 - 0.1 * 0.1)
    assert S.score(d, {"authority": 1})["on"] == pytest.approx(-0.6)  # the other sign is movement against it


def test_answer_mass_lost_alike_by_every_answer_moves_nothing():
    base = _base()
    d = S.delta(_rows(base), _rows(base - 3.0))  # every option 3 nats less likely: incoherence, no preference
    assert S.score(d, {"authority": -1}) == pytest.approx({"on": 0.0, "off": 0.0, "selectivity": 0.0})


def test_off_is_the_size_of_each_foundations_mean_move_so_opposite_row_moves_cancel():
    base = _base(n=2)
    moved = base.copy()
    moved[0, 0] += 1.4  # care up on one vignette, down on the other: no net care move
    moved[1, 0] -= 1.4
    assert S.score(S.delta(_rows(base), _rows(moved)), {"authority": -1})["off"] == pytest.approx(0.0, abs=1e-12)


def test_companions_count_as_intended_and_leave_off():
    base = _base()
    moved = base.copy()
    moved[:, A] -= 0.7
    moved[:, 0] += 0.7  # care up as much as authority down: centred, on moves 0.7 each, the rest 0
    d = S.delta(_rows(base), _rows(moved))
    strict = S.score(d, {"authority": -1})
    loose = S.score(d, {"authority": -1, "care": 1})
    assert strict["on"] == pytest.approx(0.7) and strict["off"] == pytest.approx(0.7 / 6)
    assert loose["on"] == pytest.approx(0.7) and loose["off"] == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_intervals_bracket_the_point_and_collapse_when_every_vignette_moves_alike():
    rng = np.random.default_rng(3)
    base = _base(n=40)
    alike = base.copy()
    alike[:, A] -= 0.7
    varied = base.copy()
    varied[:, A] -= rng.normal(0.7, 0.5, size=40)
    deltas = {"alike": S.delta(_rows(base), _rows(alike)), "varied": S.delta(_rows(base), _rows(varied))}
    res = S.selectivity(deltas, {"authority": -1}, ref="alike", n_boot=500)
    a, v = res["alike"], res["varied"]
    assert a["selectivity_lo"] == pytest.approx(a["selectivity"]) == pytest.approx(a["selectivity_hi"])
    assert v["selectivity_lo"] < v["selectivity"] < v["selectivity_hi"]
    assert v["selectivity_hi"] - v["selectivity_lo"] > 0.1  # 0.5 nat spread over 40 rows: about +-0.15
    assert (a["d_sel"], a["d_sel_lo"], a["d_sel_hi"]) == (0.0, 0.0, 0.0)  # paired: itself minus itself
    assert v["d_sel_lo"] <= v["d_sel"] <= v["d_sel_hi"]
    again = S.selectivity(deltas, {"authority": -1}, ref="alike", n_boot=500)
    assert again == res  # seeded


def test_evals_of_other_vignettes_are_refused():
    base = _base(n=3)
    with pytest.raises(ValueError, match="different vignettes"):
        S.delta(_rows(base, ids=[1, 2, 3]), _rows(base, ids=[1, 3, 2]))
    with pytest.raises(ValueError, match="unknown"):
        S.score(np.zeros((3, 7)), {"autority": -1})


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_round_selectivity_reads_the_healed_and_steered_rows_of_a_loop_run(tmp_path):
    (tmp_path / "evals").mkdir()
    base = _base()
    steered, healed = base.copy(), base.copy()
    steered[:, A] -= 1.4
    healed[:, A] -= 0.7
    for name, lp in (("base_r-1", base), ("steered_r0", steered), ("healed_r0", healed)):
        _write(tmp_path / "evals" / f"{name}.jsonl", _rows(lp))
    got = S.round_selectivity(tmp_path, "authority", -1, 0)
    assert got["healed_on"] == pytest.approx(0.6) and got["healed_off"] == pytest.approx(0.1)
    assert got["steered_on"] == pytest.approx(1.2) and got["healed_selectivity"] == pytest.approx(0.59)
    assert got["healed_sel_lo"] == pytest.approx(0.59) == pytest.approx(got["healed_sel_hi"])
    with pytest.raises(FileNotFoundError, match=r"steered_r1.jsonl is missing"):
        S.round_selectivity(tmp_path, "authority", -1, 1)
