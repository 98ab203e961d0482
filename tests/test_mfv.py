import math

import numpy as np
import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from shl import mfv
from shl.models import chat_prompt
from shl.params import FOUNDATIONS


def _prompts(tok, n, presented=mfv.OPTIONS, system=None):
    return [chat_prompt(tok, mfv.user_message(v["text"], presented), system, prefill=mfv.PREFILL)
            for v in mfv.load_vignettes(n)]


def test_ships_the_132_clifford_vignettes_with_citation():
    from importlib import resources
    rows = mfv.load_vignettes()
    assert len(rows) == 132 and len({r["id"] for r in rows}) == 132
    assert {r["foundation_coarse"] for r in rows} == set(mfv.COARSE)
    assert "10.3758/s13428-014-0551-2" in resources.files("shl").joinpath("data/mfv_NOTICE.md").read_text()


def test_subset_by_count_spreads_over_foundations():
    rows = mfv.load_vignettes(14)
    assert len(rows) == 14
    assert all(sum(r["foundation_coarse"] == f for r in rows) == 2 for f in mfv.COARSE)


def test_p_sums_to_one_and_pmass_is_a_probability(tiny):
    model, tok = tiny
    res = mfv.evaluate(model, tok, n=14, batch_size=5, progress=False)
    table = res.table()
    np.testing.assert_allclose(table[[f"p_{f}" for f in FOUNDATIONS]].sum(axis=1), 1.0, atol=1e-9)
    assert ((table.pmass > 0) & (table.pmass <= 1)).all()
    for key in ("coherence", "top1_acc", "ppx_json", "seconds", *(f"{f}_nats" for f in FOUNDATIONS)):
        assert np.isfinite(res.summary[key]), key
    assert res.record("base")["round"] == -1 and res.record("base")["stage"] == "base"
    assert sum(res.human_profile.values()) == pytest.approx(1.0)


def test_forward_reversed_mean_cancels_a_planted_position_bias(tiny):
    _, tok = tiny
    rng = np.random.default_rng(0)
    n = 21
    true = np.log(rng.dirichlet(np.ones(7), size=n)) - 1.0  # [N, 7] in FOUNDATIONS order

    def biased(bias):
        def scorer(prompts, presented):
            canon = np.array([mfv.OPTIONS.index(o) for o in presented])
            return true[:, canon] + bias * np.arange(7), np.zeros(len(prompts))  # slot j gets +bias*j
        return scorer

    clean = mfv.evaluate(None, tok, n=n, progress=False, scorer=biased(0.0))
    planted = mfv.evaluate(None, tok, n=n, progress=False, scorer=biased(1.5))
    np.testing.assert_allclose(planted.table()[[f"p_{f}" for f in FOUNDATIONS]],
                               clean.table()[[f"p_{f}" for f in FOUNDATIONS]], atol=1e-12)
    # one order alone would carry the bias: the averaging is what removes it
    single = mfv.aggregate(mfv.load_vignettes(n), *[biased(1.5)([None] * n, mfv.OPTIONS)[0]] * 2, np.zeros(n), np.zeros(n))
    assert np.abs(single.table()["p_socialnorms"] - clean.table()["p_socialnorms"]).max() > 0.1


def test_answer_word_masses_split_coherence_and_follow_the_word_that_lost_mass():
    n = 14
    rng = np.random.default_rng(1)
    vignettes = mfv.load_vignettes(n)
    logp = np.log(rng.dirichlet(np.ones(8), size=n)[:, :7])  # [N, 7]: 1/8 of the mass off the options
    zeros = np.zeros(n)
    res = mfv.aggregate(vignettes, logp, logp - 0.1, zeros, zeros)
    masses = [res.summary[f"{f}_mass"] for f in FOUNDATIONS]
    assert sum(masses) == pytest.approx(res.summary["coherence"], abs=1e-12)
    # halve the sanctity word's mass in every row: coherence falls by exactly that word's loss
    j = FOUNDATIONS.index("sanctity")
    low = logp.copy()
    low[:, j] += math.log(0.5)
    moved = mfv.aggregate(vignettes, low, low - 0.1, zeros, zeros)
    assert moved.summary["sanctity_mass"] == pytest.approx(res.summary["sanctity_mass"] / 2, rel=1e-12)
    assert res.summary["coherence"] - moved.summary["coherence"] == pytest.approx(
        res.summary["sanctity_mass"] / 2, rel=1e-9)
    for f in FOUNDATIONS:
        if f != "sanctity":
            assert moved.summary[f"{f}_mass"] == pytest.approx(res.summary[f"{f}_mass"], rel=1e-12), f
    # the yes/no protocol's log-probs are not answer-word masses: no mass keys there
    yesno = mfv.aggregate(vignettes, logp, logp, zeros, zeros, pmass=(zeros + 0.5, zeros + 0.5))
    assert not any(k.endswith("_mass") for k in yesno.summary)


def test_full_option_readout_equals_first_token_when_every_option_is_one_token(tiny):
    model, tok = tiny
    words = ["care", "social", "the", "and", "good", "bad", "yes"]
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)
    prompts = _prompts(tok, 7)
    full, _ = mfv.model_scorer(model, tok, prompts, words, close="", readout="full")
    first, _ = mfv.model_scorer(model, tok, prompts, words, close="", readout="first_token")
    np.testing.assert_allclose(full, first, atol=1e-6)
    # with the closing quote the full readout is lower: it also pays for ending the word
    quoted, _ = mfv.model_scorer(model, tok, prompts, words, readout="full")
    assert (quoted < first).all()


def test_multi_token_options_are_read_in_full(tiny):
    model, tok = tiny
    assert len(tok("authority", add_special_tokens=False).input_ids) > 1
    prompts = _prompts(tok, 7)
    full, _ = mfv.model_scorer(model, tok, prompts, mfv.OPTIONS, close="")
    first, _ = mfv.model_scorer(model, tok, prompts, mfv.OPTIONS, close="", readout="first_token")
    multi = [j for j, o in enumerate(mfv.OPTIONS) if len(tok(o, add_special_tokens=False).input_ids) > 1]
    assert (full[:, multi] < first[:, multi] - 1e-3).all()


def test_closing_mass_counts_every_token_that_starts_with_the_quote(tiny):
    _, tok = tiny
    ids = mfv.close_ids(tok, '"')
    texts = tok.batch_decode([[i] for i in ids])
    assert all(t.startswith('"') for t in texts) and '"' in texts and '"}' in texts


def _tiny_arch(kind, vocab):
    torch.manual_seed(0)
    if kind == "llama":  # untied, unlike tiny-random (whose greedy thoughts are all newlines)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval()
    if kind == "qwen3":
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
        return Qwen3ForCausalLM(cfg).eval()
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=512,
                           max_position_embeddings=2048, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_batched_prefix_cached_scoring_matches_the_naive_reference(tiny, arch):
    model, tok = tiny
    if arch != "llama":
        model = _tiny_arch(arch, len(tok))
    for presented in (mfv.OPTIONS, mfv.OPTIONS[::-1]):
        prompts = _prompts(tok, 9, presented, system="Stick to principle.")
        fast, fast_nll = mfv.model_scorer(model, tok, prompts, presented, batch_size=4)
        slow, slow_nll = mfv.naive_scorer(model, tok, prompts, presented)
        np.testing.assert_allclose(fast, slow, atol=1e-4)
        np.testing.assert_allclose(fast_nll, slow_nll, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_all_options_in_one_pass_read_as_one_pass_per_option(tiny, arch, impl, monkeypatch):
    model, tok = tiny
    model = _tiny_arch(arch, len(tok))
    model.config._attn_implementation = impl
    prompts = _prompts(tok, 6, system="Stick to principle.")
    assert mfv._options_mask(model, torch.ones((2, 40), dtype=torch.long), [[1], [2, 3]]) is not None
    one, one_nll = mfv.model_scorer(model, tok, prompts, mfv.OPTIONS, batch_size=4)
    monkeypatch.setattr(mfv, "_options_mask", lambda *a: None)  # the fallback: a forward pass per option
    each, each_nll = mfv.model_scorer(model, tok, prompts, mfv.OPTIONS, batch_size=4)
    np.testing.assert_allclose(one, each, atol=1e-5)
    np.testing.assert_array_equal(one_nll, each_nll)
    assert np.abs(one - one.mean(1, keepdims=True)).max() > 1e-3  # the options do differ: a shared read would not


def test_the_one_pass_mask_keeps_each_option_to_itself_and_stands_down_where_it_cannot_hold(tiny):
    model, tok = tiny
    attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = mfv._options_mask(model, attn, [[7], [8, 9]])  # [B, 1, 3 option tokens, 3 cached + 3]
    want_new = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (2, 1, 3, 6)
    assert torch.equal(mask[0, 0, :, :3], torch.tensor([[False, True, True]] * 3))
    assert torch.equal(mask[1, 0, :, 3:], want_new)
    gemma = _tiny_arch("gemma3", len(tok))  # sliding window 512: a custom mask would replace it
    assert mfv._options_mask(gemma, torch.ones((1, 500), dtype=torch.long), [[1], [2]]) is not None
    assert mfv._options_mask(gemma, torch.ones((1, 511), dtype=torch.long), [[1], [2]]) is None
    loaded = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert mfv._options_mask(model, attn, [[7]]) is None
    finally:
        model.config._attn_implementation = loaded


def test_thinking_answer_turn_closes_the_thought_and_interrupts_with_just_answer(tiny):
    _, tok = tiny
    assert mfv.answer_suffix(tok, None) == "<|im_end|>\n<|im_start|>user\nJust answer.<|im_end|>\n<|im_start|>assistant\n" + mfv.PREFILL
    # the suffix is exactly what the re-rendered conversation has after the thought
    sys_prompt, thought = "Stick to principle.", "Let me weigh it"
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": thought}]
    full = chat_prompt(tok, mfv.JUST_ANSWER, sys_prompt, history=history, prefill=mfv.PREFILL)
    assert full.endswith(thought + mfv.answer_suffix(tok, sys_prompt))


def _reencoded(model, tok, prompts, suffix, thoughts, options):
    """The slow reference: every row's whole conversation (prompt, thought ids, suffix) re-encoded
    unpadded, one forward per option."""
    suf = tok(suffix, add_special_tokens=False).input_ids
    k = len(suf) - len(tok(suffix[:-len(mfv.PREFILL)], add_special_tokens=False).input_ids)
    closing = mfv.close_ids(tok, mfv.CLOSE)
    opt = mfv._option_ids(tok, suffix, suf, options)
    logp, nll = np.zeros((len(prompts), len(options))), np.zeros(len(prompts))
    with torch.no_grad():
        for i, (p, th) in enumerate(zip(prompts, thoughts)):
            x = tok(p, add_special_tokens=False).input_ids + th + suf
            for j, o in enumerate(opt):
                lp = model(input_ids=torch.tensor([x + o])).logits.float()[0].log_softmax(-1)  # [L, V]
                logp[i, j] = sum(lp[len(x) - 1 + t, o[t]].item() for t in range(len(o))) + lp[-1, closing].logsumexp(-1).item()
            nll[i] = -np.mean([lp[len(x) - 1 - k + t, x[len(x) - k + t]].item() for t in range(k)])
    return logp, nll


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_thinking_readout_from_the_generation_cache_matches_re_encoding(tiny, arch):
    _, tok = tiny
    model = _tiny_arch(arch, len(tok))
    think = 6
    prompts = [chat_prompt(tok, mfv.user_message(v["text"], mfv.OPTIONS), "Stick to principle.") for v in mfv.load_vignettes(7)]
    suffix = mfv.answer_suffix(tok, "Stick to principle.")
    _, _, first = mfv.thinking_scorer(model, tok, prompts, suffix, think, mfv.OPTIONS, batch_size=4)
    # make a token that some row thinks early (and another row never) end the turn, so rows stop at
    # different lengths
    stop = next(t for th in first for t in th[:3] if any(t not in other for other in first))
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        logp, nll, thoughts = mfv.thinking_scorer(model, tok, prompts, suffix, think, mfv.OPTIONS, batch_size=4)
        lens = [len(t) for t in thoughts]
        assert min(lens) <= 2 and max(lens) == think, lens
        # each thought is the row's own unpadded greedy generation, cut before its stop
        for p, th in zip(prompts, thoughts):
            ids = torch.tensor([tok(p, add_special_tokens=False).input_ids])
            # the explicit mask: with pad != eos, generate would take the prompt's <|im_end|> for padding
            alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=think, do_sample=False, top_k=None,
                                   pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            assert alone[:len(th)] == th and (len(th) == think or alone[len(th)] in mfv.stop_ids(model, tok))
        ref, ref_nll = _reencoded(model, tok, prompts, suffix, thoughts, mfv.OPTIONS)
    finally:
        model.generation_config.eos_token_id = old
    np.testing.assert_allclose(logp, ref, atol=1e-4)
    np.testing.assert_allclose(nll, ref_nll, atol=1e-4)


def test_thinking_past_a_sliding_window_is_refused(tiny):
    _, tok = tiny
    model = _tiny_arch("gemma3", len(tok))
    model.config.sliding_window = 64  # the prompts alone are ~190 tokens
    prompts = [chat_prompt(tok, mfv.user_message(v["text"], mfv.OPTIONS)) for v in mfv.load_vignettes(2)]
    with pytest.raises(ValueError, match="sliding window"):
        mfv.thinking_scorer(model, tok, prompts, mfv.answer_suffix(tok, None), 4, mfv.OPTIONS)


def test_thinking_eval_runs_and_refuses_a_scorer_it_cannot_use(tiny):
    model, tok = tiny
    res = mfv.evaluate(model, tok, n=7, think_tokens=4, batch_size=4, progress=False)
    np.testing.assert_allclose(res.table()[[f"p_{f}" for f in FOUNDATIONS]].sum(axis=1), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="think_tokens 0"):
        mfv.evaluate(model, tok, n=2, think_tokens=4, progress=False,
                     scorer=lambda prompts, presented: (np.zeros((len(prompts), 7)), np.zeros(len(prompts))))


def test_parse_answer_accepts_only_allowed_json_values():
    assert mfv.parse_answer('Sure: {"violation": "care"} done') == "care"
    assert mfv.parse_answer('{"violation": "kindness"}') is None
    assert mfv.parse_answer("care") is None
    assert mfv.parse_answer('{"violation": "social"') is None


def test_json_valid_mode_reports_a_fraction(tiny):
    model, tok = tiny
    res = mfv.evaluate(model, tok, n=3, json_valid=True, json_tokens=4, progress=False)
    assert 0.0 <= res.summary["json_is_valid"] <= 1.0


@pytest.mark.slow
def test_embedded_model_puts_real_mass_on_valid_answers(tiny, embedded):
    real = mfv.evaluate(*embedded, n=14, progress=False)
    rand = mfv.evaluate(*tiny, n=14, progress=False)
    assert real.summary["coherence"] > 0.1
    assert real.summary["coherence"] > 1000 * rand.summary["coherence"]
