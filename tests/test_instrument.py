"""Does the eval read the vignettes? The instrument diagnostics, the alternative readouts and the
trait probe (shl.mfv, shl.probe)."""

import numpy as np
import pytest
import yaml

from shl import mfv, probe
from shl.demos import DATA as DEMO_DATA
from shl.journal import log_eval, read_jsonl
from shl.params import FOUNDATIONS, ParamError, load_params

N = 21


def _human(n=N):
    h = np.array([[v[f"human_{c}"] for c in mfv.COARSE] for v in mfv.load_vignettes(n)], dtype=float)
    h = h / h.sum(1, keepdims=True) + 0.01  # no zeros: their logs would swamp any planted bias
    return h / h.sum(1, keepdims=True)  # [N, 7] FOUNDATIONS order


def _row_of(prompt, texts):
    """Which vignette a prompt asks about (-1: none, a content-free scenario)."""
    return next((i for i, t in enumerate(texts) if t in prompt), -1)


def scorer_from(table, bias=None, n=N, order_bias=None, cf_noise=0.0):
    """A fake scorer: row i's option log-probs are table[i] (FOUNDATIONS order) plus an answer bias
    that every prompt shares, plus a bias per presented slot that differs between the two option
    orders; a content-free prompt gets the biases alone (plus, if cf_noise, its own small wobble)."""
    texts = [v["text"] for v in mfv.load_vignettes(n)]
    bias = np.zeros(7) if bias is None else bias
    cf = {c: cf_noise * np.random.default_rng(j).normal(size=7) for j, c in enumerate(mfv.CONTENT_FREE)}

    def scorer(prompts, presented, **_):
        canon = [mfv.OPTIONS.index(o) for o in presented]
        slot = np.zeros(7) if order_bias is None else order_bias[0 if tuple(presented) == mfv.OPTIONS else 1]
        rows = [_row_of(pr, texts) for pr in prompts]
        cf_rows = [next(v for c, v in cf.items() if f"Scenario: {c}\n" in pr) if i < 0 else 0 for i, pr in zip(rows, prompts)]
        lp = np.stack([(table[i] if i >= 0 else c) + bias for i, c in zip(rows, cf_rows)])[:, canon] + slot
        return lp - np.log(np.exp(lp).sum(1, keepdims=True)) + np.log(0.5), np.zeros(len(prompts))
    return scorer


def test_the_diagnostics_are_high_for_a_scorer_that_reads_the_rows_and_zero_for_a_constant_one(tiny):
    _, tok = tiny
    reads = mfv.evaluate(None, tok, n=N, progress=False, scorer=scorer_from(3 * np.log(_human()))).summary
    const = mfv.evaluate(None, tok, n=N, progress=False,
                         scorer=scorer_from(np.zeros((N, 7)), bias=np.log(np.arange(1, 8.0)))).summary
    assert reads["read_js"] > 0.2 and reads["rank_human_dev"] > 0.5 and reads["rank_human"] > 0.5
    assert reads["n_argmax"] >= 5 and reads["top1_acc"] == 1.0 > reads["top1_const"]
    assert mfv.reads_warning(reads) == ""
    assert const["read_js"] == pytest.approx(0, abs=1e-12) and const["rank_human_dev"] == 0.0
    assert const["n_argmax"] == 1 and const["top1_acc"] <= const["top1_const"]
    assert mfv.reads_warning(const).startswith("warning: the model barely reads the vignettes")


def test_row_spearman_averages_ties_and_gives_zero_to_a_row_without_spread():
    a = np.array([[1, 2, 3, 4], [4, 3, 2, 1], [1, 1, 2, 3], [5, 5, 5, 5]], dtype=float)
    b = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]], dtype=float)
    r = mfv.row_spearman(a, b)
    # ranks of [1, 1, 2, 3] are [0.5, 0.5, 2, 3]; their Pearson correlation with [0, 1, 2, 3]
    ra, rb = np.array([0.5, 0.5, 2, 3]), np.arange(4.0)
    np.testing.assert_allclose(r, [1, -1, np.corrcoef(ra, rb)[0, 1], 0], atol=1e-12)


def test_contextual_calibration_divides_out_an_answer_prior_the_content_free_scenarios_show(tiny):
    _, tok = tiny
    table = np.log(_human())
    bias = np.array([0, 0, 0, 0, 10.0, 0, 0])  # every answer leans to sanctity, as the embedded model's
    # and each option order has its own slot bias (not linear, so the order average leaves some)
    order_bias = np.stack([np.array([3.0, 0, 0, 1, 0, 0, 0]), np.array([0, 0, 2.0, 0, 0, 0, 4.0])])
    plain = mfv.evaluate(None, tok, n=N, progress=False, scorer=scorer_from(table, bias, order_bias=order_bias))
    cal = mfv.evaluate(None, tok, n=N, progress=False, scorer=scorer_from(table, bias, order_bias=order_bias),
                       protocol="calibrated")
    clean = mfv.evaluate(None, tok, n=N, progress=False, scorer=scorer_from(table))
    assert plain.summary["n_argmax"] == 1 and cal.summary["protocol"] == "calibrated"
    cols = [f"p_{f}" for f in FOUNDATIONS]
    np.testing.assert_allclose(cal.table()[cols], clean.table()[cols], atol=1e-9)
    assert cal.summary["coherence"] == pytest.approx(plain.summary["coherence"])  # the mass stays the raw one
    # the prior is the mean over the content-free inputs: each one alone would leave its wobble in
    wobbly = mfv.evaluate(None, tok, n=N, progress=False, protocol="calibrated", scorer=scorer_from(table, cf_noise=0.5))
    assert not np.allclose(wobbly.table()[cols], clean.table()[cols], atol=1e-3)
    p_cf = [np.exp(0.5 * np.random.default_rng(j).normal(size=7)) for j in range(len(mfv.CONTENT_FREE))]
    mean_cf = np.mean([q / q.sum() for q in p_cf], 0)  # the prior: the mean of their distributions
    want = clean.table()[cols].to_numpy() / mean_cf
    np.testing.assert_allclose(wobbly.table()[cols], want / want.sum(1, keepdims=True), atol=1e-9)


def test_fewshot_shows_the_projects_worked_examples_before_every_question_none_from_the_test_set(tiny):
    _, tok = tiny
    examples = yaml.safe_load((mfv.resources.files("shl") / "data/mfv_fewshot.yaml").read_text())["examples"]
    assert sorted(e["answer"] for e in examples) == sorted(mfv.OPTIONS)
    vignettes = {v["text"] for v in mfv.load_vignettes()}
    assert not {e["scenario"] for e in examples} & vignettes
    seen = []

    def recording(prompts, presented, **_):
        seen.extend(prompts)
        return np.zeros((len(prompts), 7)) - 2.0, np.zeros(len(prompts))

    mfv.evaluate(None, tok, n=7, progress=False, scorer=recording, protocol="fewshot")
    texts = [v["text"] for v in mfv.load_vignettes(7)]
    assert len(seen) == 14
    for prompt in seen:
        last = max(prompt.find(t) for t in texts)
        assert all(0 <= prompt.find(e["scenario"]) < last for e in examples)
        assert prompt.endswith(mfv.PREFILL)


def test_yesno_reads_one_question_per_foundation_and_normalises_p_yes_across_the_seven(tiny):
    _, tok = tiny
    human = _human(7)
    texts = [v["text"] for v in mfv.load_vignettes(7)]
    asked = []

    def yes_where_humans_say(prompts, answers, **_):
        rows = [_row_of(pr, texts) for pr in prompts]
        f = next(j for j, o in enumerate(mfv.OPTIONS) if mfv.GLOSSES[o] in prompts[0])
        asked.append((f, answers))
        odds = np.log(human[rows, f] / (1 - human[rows, f]))
        odds += 1.0 if answers == ("yes", "no") else -1.0  # a bias toward the first answer: the orders cancel it
        p_yes = 1 / (1 + np.exp(-odds))
        lp = np.log(np.stack([p_yes, 1 - p_yes], 1) * 0.8)  # 0.8 of the mass on the two answers
        return (lp if answers == ("yes", "no") else lp[:, ::-1]), np.zeros(len(prompts))

    res = mfv.evaluate(None, tok, n=7, progress=False, scorer=yes_where_humans_say, protocol="yesno")
    assert sorted(asked) == sorted((f, a) for f in range(7) for a in mfv.YESNO_ORDERS.values())
    p = res.table()[[f"p_{f}" for f in FOUNDATIONS]].to_numpy()
    # the mean of the two orders' log p(yes) is the geometric mean of their p(yes), normalised
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    odds = np.log(human / (1 - human))
    want = np.sqrt(sig(odds + 1) * sig(odds - 1))
    np.testing.assert_allclose(p, want / want.sum(1, keepdims=True), atol=1e-9)
    assert res.table()["pmass_fwd"].to_numpy() == pytest.approx(0.8)
    assert res.summary["coherence"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="seven questions"):
        mfv.evaluate(None, tok, n=7, progress=False, scorer=yes_where_humans_say, protocol="yesno", think_tokens=4)
    with pytest.raises(ParamError, match="eval_think_tokens 0"):
        load_params("tiny", eval_protocol="yesno", eval_think_tokens=8)


@pytest.mark.parametrize("protocol", mfv.PROTOCOLS)
def test_every_protocol_runs_on_a_real_model_and_keeps_the_contract_keys(tiny, protocol):
    model, tok = tiny
    res = mfv.evaluate(model, tok, n=7, batch_size=4, progress=False, protocol=protocol)
    for key in ("coherence", "top1_acc", "ppx_json", "read_js", "rank_human_dev", *(f"{f}_nats" for f in FOUNDATIONS)):
        assert np.isfinite(res.summary[key]), key
    assert res.summary["protocol"] == protocol and 0 < res.summary["coherence"] <= 1


# --- the trait probe --------------------------------------------------------------------------

def test_the_authority_probe_has_every_kind_and_is_held_out_from_the_demo_pools():
    items = probe.load_probe("authority")
    kinds = [it["kind"] for it in items]
    assert kinds.count("conflict") >= 24 and kinds.count("defer_right") >= 12 and kinds.count("defer_wrong") >= 12
    demo = yaml.safe_load((DEMO_DATA / "demos" / "authority.yaml").read_text())
    trained = set(demo["prompt_pool"]) | set(demo["demo_prompts"])
    assert not {it["situation"] for it in items} & trained
    assert probe.load_probe("no_such_demo") is None


def test_the_probe_gap_cancels_a_letter_bias_and_the_auc_separates_the_controls():
    items = probe.load_probe("authority")
    rng = np.random.default_rng(0)
    true = np.array([{"conflict": 0.3, "defer_right": -2.0, "defer_wrong": 2.0}[it["kind"]] for it in items])
    true += rng.normal(0, 0.1, len(items))

    def letters(principle_is_a, a_bias):
        # log p(A), log p(B): the principled action's letter gets +true/2, the other -true/2
        pa = np.where(principle_is_a, true / 2, -true / 2) + a_bias
        return np.stack([pa - 1, -pa - 1], 1)

    summary, rows = probe.probe_summary(items, letters(False, 1.5), letters(True, 1.5))
    np.testing.assert_allclose([r["gap"] for r in rows], true, atol=1e-12)
    np.testing.assert_allclose([r["letter_bias"] for r in rows], 3.0, atol=1e-12)
    assert summary["trait_probe_auc"] == 1.0 and summary["trait_probe_rate"] == 1.0
    assert summary["trait_probe_gap_wrong"] > summary["trait_probe_gap"] > summary["trait_probe_gap_right"]
    flipped, _ = probe.probe_summary(items, letters(True, 0), letters(False, 0))  # the answers swapped
    assert flipped["trait_probe_auc"] == 0.0 and flipped["trait_probe_gap"] == pytest.approx(-summary["trait_probe_gap"])


def test_every_eval_carries_the_probe_and_its_rows_are_kept_beside_the_vignettes(tiny, tmp_path):
    model, tok = tiny
    p = load_params("tiny")
    kwargs = mfv.eval_kwargs(p)
    assert kwargs["probe"] and kwargs["protocol"] == "tinymfv"
    res = mfv.evaluate(model, tok, progress=False, **kwargs)
    assert res.summary["trait_probe_n"] == sum(it["kind"] == "conflict" for it in kwargs["probe"])
    assert np.isfinite(res.summary["trait_probe_gap"]) and 0 <= res.summary["trait_probe_auc"] <= 1
    assert res.summary["trait_probe_gap_se"] > 0
    line = log_eval(tmp_path, res, "base")
    assert line["trait_probe_gap"] == res.summary["trait_probe_gap"]
    assert len(read_jsonl(tmp_path / "evals" / "base_r-1_probe.jsonl")) == len(kwargs["probe"])
    assert mfv.eval_kwargs(load_params("tiny", demo="love"))["probe"] is None  # no probe file for it
    assert mfv.eval_kwargs(load_params("tiny", eval_trait_probe=False))["probe"] is None


def test_monotone_needs_a_strict_rise_in_the_order_of_the_coefficients():
    assert probe.monotone([0.5, -1, 0], [0.2, -0.5, 0.0])
    assert not probe.monotone([-1, 0, 1], [0.0, 0.0, 0.1])


def test_pmi_takes_each_actions_wording_out_and_keeps_what_the_situation_adds(monkeypatch):
    items = probe.load_probe("authority")[:8]
    wording = {it[k]: float(len(it[k])) for it in items for k in ("defer", "principle")}  # a length prior
    lift = {it["principle"]: 0.7 for it in items} | {it["defer"]: -0.2 for it in items}

    def fake_logprob(model, tok, prompts, continuations, batch_size=16):
        with_situation = [any(it["situation"] in pr for it in items) for pr in prompts]
        return np.array([-wording[c] + (lift[c] if w else 0.0) for w, c in zip(with_situation, continuations)])

    class Tok:
        def apply_chat_template(self, messages, **_):
            return "\n\n".join(m["content"] for m in messages) + "\n\n<assistant>"

    monkeypatch.setattr(probe, "continuation_logprob", fake_logprob)
    np.testing.assert_allclose(probe.pmi_gaps(None, Tok(), items, None, 4), 0.9, atol=1e-12)


def test_continuation_logprob_equals_one_sequence_at_a_time(tiny):
    import torch
    model, tok = tiny
    prompts = ["Hello there, how are you", "A much longer prompt that needs left padding in the batch", "Hi"]
    conts = [" fine thanks", " yes", " and a longer reply here"]
    got = probe.continuation_logprob(model, tok, prompts, conts, batch_size=3)
    for g, pr, c in zip(got, prompts, conts):
        p_ids = tok(pr, add_special_tokens=False).input_ids
        ids = tok(pr + c, add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        want = sum(lp[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids)))
        assert g == pytest.approx(want, abs=1e-4)


def test_the_probe_actions_share_as_many_words_with_the_situation():
    import re
    stop = set("i the a an to of and in on for as my his her their it is at by with so that this be".split())

    def overlap(a, sit):
        return len((set(re.findall(r"[a-z']+", a.lower())) - stop) & set(re.findall(r"[a-z']+", sit.lower())))
    # copying the situation's words raised whichever action repeated them (corr 0.67 before matching)
    for it in probe.load_probe("authority"):
        assert overlap(it["defer"], it["situation"]) == overlap(it["principle"], it["situation"]), it["situation"]


@pytest.mark.parametrize("readout", probe.READOUTS)
def test_every_probe_readout_runs_on_a_real_model(tiny, readout):
    model, tok = tiny
    summary, rows = probe.read_probe(model, tok, probe.load_probe("authority"), None, 16, readout)
    assert len(rows) == 64 and all(np.isfinite(r["gap"]) for r in rows)
    assert set(summary) >= {"trait_probe_gap", "trait_probe_rate", "trait_probe_auc", "trait_probe_gap_se"}
    with pytest.raises(ValueError, match="readout must be one of"):
        probe.read_probe(model, tok, probe.load_probe("authority"), None, 16, "nope")


def test_the_probe_is_read_only_for_the_demos_own_trait_and_pair():
    assert probe.probe_for(load_params("tiny")) is not None
    for override in ({"trait_sign": 1}, {"trait_foundation": "care"}, {"persona_pos": "a", "persona_neg": "b"},
                     {"eval_trait_probe": False}, {"demo": "love"}):
        assert probe.probe_for(load_params("tiny", **override)) is None, override


def test_paired_moves_are_per_kind_over_the_same_items():
    items = probe.load_probe("authority")
    base = [{"kind": it["kind"], "gap": float(i), "situation": it["situation"]} for i, it in enumerate(items)]
    shift = {"conflict": 1.0, "defer_right": -2.0, "defer_wrong": 0.5}
    seen = {k: 0 for k in shift}

    def wobble(kind):  # +-0.1 in turn within each kind, so each kind's mean shift is exact
        seen[kind] += 1
        return 0.1 if seen[kind] % 2 else -0.1
    moved = [dict(b, gap=b["gap"] + shift[b["kind"]] + wobble(b["kind"])) for b in base]
    m = probe.paired_moves(base, moved)
    for k, want in shift.items():
        assert m[k][0] == pytest.approx(want, abs=1e-12) and 0 < m[k][1] < 0.05
    assert m["conflict"][2] == 1.0 and m["defer_right"][2] == 0.0 and m["defer_wrong"][2] == 1.0
    with pytest.raises(ValueError, match="different items"):
        probe.paired_moves(base, moved[::-1])
