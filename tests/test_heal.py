import copy
import json
import math

import pytest
import torch
from peft import PeftModel

from conftest import randomize_lora
from shl import heal as H
from shl import history as HI
from shl.models import chat_prompt
from shl.params import load_params


def _records(tok, n=8):
    return [{"chat_prompt": chat_prompt(tok, f"Tell me about thing {i}."), "completion": f"Thing {i} is small and red."}
            for i in range(n)]


def _batch(tok, n=2):
    return H.collate(H.encode_records(tok, _records(tok, n)), tok.pad_token_id)




def _loss(model, batch, p, round_idx, ref_names, adapter):
    """heal_loss with the batch's reference states computed as heal computes them."""
    ref = None if p.reg == "nll" else H.batch_frozen_states(model, batch, ref_names, 0, check=True)[0]
    return H.heal_loss(model, batch, p, round_idx, adapter, ref)


def _student(tiny, p, seed=1):
    """A deep copy of tiny with adapter r0 non-zero and trainable (the session fixture stays untouched)."""
    model = HI.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
    randomize_lora(model, "r0", seed)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _grads(term, model):
    params = [q for q in model.parameters() if q.requires_grad]
    return torch.autograd.grad(term, params, retain_graph=True)


def _lora_weights(model, name):
    return [w.detach().clone() for A, B, _ in HI.lora_pairs(model, name) for w in (A, B)]


# --- config ----------------------------------------------------------------------------------

def test_lora_config_targets_only_the_band_layers(tiny):
    p = load_params("tiny", heal_band=[0.5, 1.0], lora_modules=["q_proj", "down_proj"])
    cfg = HI.lora_config(tiny[0], p)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.0)
    model = HI.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, HI.LoraLayer))
    assert adapted == ["base_model.model.model.layers.1.mlp.down_proj", "base_model.model.model.layers.1.self_attn.q_proj"]


# --- barrier gradients -----------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(lam=0.0, tau=0.0), dict(lam=1.0, tau=1e6)], ids=["lam0", "D_below_tau"])
def test_inactive_barrier_adds_exactly_no_gradient(tiny, overrides):
    p = load_params("tiny", reg="kl_rev", kl_agg="rmse", spectral_lam=0.0, **overrides)
    model = _student(tiny, p)
    t = _loss(model, _batch(tiny[1]), p, 0, [], "r0")
    assert t["D"].item() > 0.01  # the student really differs from the reference
    for g_total, g_nll in zip(_grads(t["total"], model), _grads(t["nll"], model)):
        assert torch.equal(g_total, g_nll)
    # the same batch with a live barrier does change the gradient: the comparison above can fail
    live = load_params("tiny", reg="kl_rev", kl_agg="rmse", spectral_lam=0.0, lam=1.0, tau=0.0)
    t = _loss(model, _batch(tiny[1]), live, 0, [], "r0")
    assert any(not torch.equal(a, b) for a, b in zip(_grads(t["total"], model), _grads(t["nll"], model)))


def test_kl_matches_torch_distributions(tiny):
    p = load_params("tiny")
    model = _student(tiny, p)
    b = _batch(tiny[1])
    with torch.no_grad():
        logp_s = H.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        with HI.adapters(model, []):
            logp_r = H.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    student, ref = torch.distributions.Categorical(logits=logp_s), torch.distributions.Categorical(logits=logp_r)
    rev, fwd = H.per_position_kl(logp_s, logp_r, "kl_rev"), H.per_position_kl(logp_s, logp_r, "kl_fwd")
    torch.testing.assert_close(rev, torch.distributions.kl_divergence(student, ref), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fwd, torch.distributions.kl_divergence(ref, student), rtol=1e-4, atol=1e-6)
    assert rev.min() > 0 and not torch.allclose(rev, fwd)


@pytest.mark.parametrize("how", ["rmse", "p95", "max"])
def test_outlier_aggregates_follow_spikes_that_mean_dilutes(how):
    kl = torch.tensor([0.01] * 60 + [5.0] * 4)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    s = sorted(kl.tolist())
    pos = 0.95 * (len(s) - 1)  # linear interpolation between order statistics
    expected = {"mean": sum(s) / len(s), "rmse": math.sqrt(sum(x * x for x in s) / len(s)),
                "p95": s[math.floor(pos)] + (pos - math.floor(pos)) * (s[math.ceil(pos)] - s[math.floor(pos)]),
                "max": 5.0}
    mean = H.aggregate_kl(kl, "mean").item()
    assert mean == pytest.approx(expected["mean"], rel=1e-6)
    assert H.aggregate_kl(kl, how).item() == pytest.approx(expected[how], rel=1e-5)
    assert H.aggregate_kl(kl, how).item() > 3 * mean


def test_rmse_has_a_finite_gradient_when_the_student_equals_the_reference():
    # round 0, first step: B = 0, so every per-position KL is exactly 0; sqrt's backward is NaN there
    kl = torch.zeros(10, requires_grad=True)
    (1.0 * torch.relu(H.aggregate_kl(kl, "rmse") - 0.05)).backward()
    assert torch.equal(kl.grad, torch.zeros(10))


def test_lam_eff():
    assert H.lam_eff(load_params("tiny", lam=2.0, lam_round_pow=-0.5), 3) == pytest.approx(1.0)
    assert H.lam_eff(load_params("tiny", lam=2.0, lam_round_pow=-0.5), 0) == pytest.approx(2.0)


# --- masking ---------------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_completion_and_its_end_of_turn(tiny):
    tok = tiny[1]
    recs = _records(tok, 2)
    recs[1]["completion"] = "A much longer answer, so that the first row gets padded at the end."
    ex = H.encode_records(tok, recs)
    b = H.collate(ex, tok.pad_token_id)
    eot = H.end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    for row, (p_ids, c_ids) in enumerate(ex):
        n = len(p_ids) + len(c_ids)
        assert c_ids[-1] == eot
        assert tok.decode(c_ids[:-1]) == recs[row]["completion"]
        assert b["loss_mask"][row].tolist() == [0] * len(p_ids) + [1] * len(c_ids) + [0] * (b["input_ids"].shape[1] - n)
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
    assert b["attention_mask"][0, -1] == 0  # the short row really is padded


def test_nll_sees_only_completion_tokens(tiny):
    model, tok = tiny
    recs = _records(tok, 2)
    recs[1]["completion"] = "A much longer answer, so that the first row gets padded at the end."
    b = H.collate(H.encode_records(tok, recs), tok.pad_token_id)
    ids, attn, mask = b["input_ids"], b["attention_mask"], b["loss_mask"]
    with torch.no_grad():
        logp = H.completion_logprobs(model, ids, attn, mask)
        loss = H.completion_nll(logp, ids, mask)
        # reference: full log_softmax, then keep the completion positions only
        full = model(input_ids=ids, attention_mask=attn).logits.log_softmax(-1)  # [B, L, V]
        tok_lp = full[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [B, L-1]: logits at t-1 score token t
        sel = mask[:, 1:].bool()
        torch.testing.assert_close(loss, -tok_lp[sel].mean())
        assert not torch.isclose(loss, -(tok_lp * attn[:, 1:]).sum() / attn[:, 1:].sum())

        # other labels where the mask is 0 (prompt and padding), same logits: same loss, bit for bit
        relabel = ids.clone()
        relabel[mask == 0] = 123
        assert torch.equal(H.completion_nll(logp, relabel, mask), loss)
        # another label on one completion token: another loss
        relabel = ids.clone()
        c = mask[0].nonzero()[0, 0]
        relabel[0, c] = (relabel[0, c] + 1) % full.shape[-1]
        assert not torch.equal(H.completion_nll(logp, relabel, mask), loss)
        # different padding ids (attention 0, after the sequence) do not reach any completion position
        repad = ids.clone()
        repad[attn == 0] = 7
        assert torch.equal(H.completion_nll(H.completion_logprobs(model, repad, attn, mask), repad, mask), loss)


# --- adapters and history --------------------------------------------------------------------

def test_disabled_adapters_give_the_base_logits_bit_for_bit(tiny):
    p = load_params("tiny")
    model = _student(tiny, p)
    b = _batch(tiny[1])
    base = _logits(tiny[0], b)
    assert not torch.equal(_logits(model, b), base)
    with HI.adapters(model, []):
        assert torch.equal(_logits(model, b), base)
    HI.set_active(model, [])
    assert torch.equal(_logits(model, b), base)


def test_adapters_context_restores_active_list_and_frozen_history(tiny):
    p = load_params("tiny")
    model = _student(tiny, p)
    HI.freeze(model, ["r0"])
    model = HI.add_round_adapter(model, p, 1)
    assert model.active_adapters == ["r0", "r1"]

    def trainable():
        return {n.split(".lora_")[1].split(".")[1] for n, q in model.named_parameters() if q.requires_grad}

    assert trainable() == {"r1"}
    for names in ([], ["r0"], ["r1"]):
        with pytest.raises(KeyError):
            with HI.adapters(model, names):
                raise KeyError("boom")
        assert model.active_adapters == ["r0", "r1"]
        assert trainable() == {"r1"}  # peft's re-enable would have made r0 trainable again


def test_reference_prev_differs_from_base_once_history_exists(tiny):
    b = _batch(tiny[1])
    for ref in ("prev", "base"):
        p = load_params("tiny", reg="kl_rev", kl_agg="mean", barrier_ref=ref, spectral_lam=0.0)
        model = HI.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
        # round 0: no history, both references are the base model and the fresh student equals it
        assert H.reference_names(p, []) == []
        assert _loss(model, b, p, 0, H.reference_names(p, []), "r0")["D"].item() == 0.0
    history = load_params("tiny")
    model = _student(tiny, history)
    HI.freeze(model, ["r0"])
    model = HI.add_round_adapter(model, history, 1)  # fresh r1: the student equals the history
    with HI.adapters(model, H.reference_names(load_params("tiny", barrier_ref="prev"), ["r0"])):
        prev = _logits(model, b)
    with HI.adapters(model, H.reference_names(load_params("tiny", barrier_ref="base"), ["r0"])):
        base = _logits(model, b)
    assert not torch.allclose(prev, base)
    D = {ref: _loss(model, b, load_params("tiny", reg="kl_rev", barrier_ref=ref, spectral_lam=0.0), 1,
                          H.reference_names(load_params("tiny", barrier_ref=ref), ["r0"]), "r1")["D"].item()
         for ref in ("prev", "base")}
    assert D["prev"] == 0.0 and D["base"] > 0.01


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_adapters_reload_and_stack(tiny, tmp_path):
    p = load_params("tiny")
    model = _student(tiny, p, seed=1)
    model = HI.add_round_adapter(model, p, 1)
    randomize_lora(model, "r1", seed=2)
    b = _batch(tiny[1])
    logits = {}
    for names in (["r0"], ["r1"], ["r0", "r1"]):
        with HI.adapters(model, names):
            logits[tuple(names)] = _logits(model, b)
    paths = {n: HI.save_adapter(model, n, tmp_path / "adapters" / n) for n in ("r0", "r1")}
    for path in paths.values():
        assert (path / "adapter_model.safetensors").exists()
        assert json.loads((path / "adapter_config.json").read_text())["r"] == 4

    alone = PeftModel.from_pretrained(copy.deepcopy(tiny[0]), str(paths["r0"]))
    torch.testing.assert_close(_logits(alone, b), logits[("r0",)], rtol=0, atol=0)

    stacked = HI.load_adapters(copy.deepcopy(tiny[0]), paths)
    assert stacked.active_adapters == ["r0", "r1"]
    assert not any(q.requires_grad for q in stacked.parameters())
    torch.testing.assert_close(_logits(stacked, b), logits[("r0", "r1")], rtol=0, atol=0)
    assert not torch.allclose(logits[("r0", "r1")], logits[("r0",)])
    assert not torch.allclose(logits[("r0", "r1")], logits[("r1",)])


# --- spectral --------------------------------------------------------------------------------

def test_sigma_max_matches_the_spectral_norm_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 64, generator=g, requires_grad=True)
    B = torch.randn(64, 4, generator=g, requires_grad=True)
    true = torch.linalg.matrix_norm(B @ A, ord=2)
    est = H.sigma_max(A, B, iters=30)
    assert abs(est.item() / true.item() - 1) < 0.01
    assert H.sigma_max(A, B, iters=1).item() <= true.item() * (1 + 1e-6)  # a few steps: a lower bound
    est.backward()
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


def test_spectral_term_sums_scaled_sigma_over_the_adapters_pairs(tiny):
    p = load_params("tiny")
    model = _student(tiny, p)
    pairs = list(HI.lora_pairs(model, "r0"))
    assert len(pairs) == 14  # 7 projections x 2 layers
    expected = sum(torch.linalg.matrix_norm(s * (B @ A), ord=2) for A, B, s in pairs)
    torch.testing.assert_close(H.spectral_term(model, "r0", 50), expected, rtol=1e-3, atol=0)


# --- the training loop -----------------------------------------------------------------------

STEP_KEYS = {"step", "epoch", "nll", "D", "barrier_fired", "grad_nll", "grad_barrier", "pressure", "lr"}


def test_heal_trains_the_new_adapter_only_and_logs_every_step(tiny):
    tok = tiny[1]
    p = load_params("tiny", reg="kl_rev", tau=0.0, lr=1e-2, heal_grad_every=1)
    model = _student(tiny, p)  # r0 still trainable: heal must freeze the history itself
    before = _lora_weights(model, "r0")
    model, log = H.heal(model, tok, _records(tok, 8), p, round_idx=1, history=["r0"], progress=False)

    # 8 records: 1 held out, 7 train in micro-batches of 2 -> 4 optimizer steps
    assert [s["step"] for s in log["steps"]] == [0, 1, 2, 3]
    for s in log["steps"]:
        assert STEP_KEYS <= set(s)
        assert math.isfinite(s["nll"]) and s["grad_nll"] > 0
        assert s["pressure"] == pytest.approx(s["grad_barrier"] / s["grad_nll"])
    # the fresh r1 equals the history at step 0 (B = 0), so the barrier (ref = prev) is silent first
    assert log["steps"][0]["D"] == 0.0 and log["steps"][0]["grad_barrier"] == 0.0
    assert log["barrier_fired_any"] and any(s["grad_barrier"] > 0 for s in log["steps"])
    assert len(log["epochs"]) == 1 and math.isfinite(log["epochs"][0]["heldout_nll"])
    assert set(log) >= {"steps", "epochs", "final_D", "seconds", "barrier_fired_any"}

    assert model.active_adapters == ["r0", "r1"]
    assert not any(q.requires_grad for q in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, _lora_weights(model, "r0")))
    assert all(B.abs().sum() > 0 for _, B, _ in HI.lora_pairs(model, "r1"))


def test_the_barrier_gradient_reaches_the_update_and_lam0_equals_nll(tiny):
    tok = tiny[1]
    trained = {}
    for key, over in {"nll": dict(reg="nll"), "lam0": dict(reg="kl_rev", lam=0.0), "lam10": dict(reg="kl_rev", lam=10.0)}.items():
        # the history r0 is non-zero and the reference is base: the barrier fires from the first step
        p = load_params("tiny", barrier_ref="base", tau=0.0, lr=1e-2, **over)
        model, log = H.heal(_student(tiny, p), tok, _records(tok, 4), p, round_idx=1, history=["r0"], progress=False)
        assert len(log["steps"]) == 2
        trained[key] = (_lora_weights(model, "r1"), log)
    assert all(torch.equal(a, b) for a, b in zip(trained["nll"][0], trained["lam0"][0]))
    assert any(not torch.equal(a, b) for a, b in zip(trained["nll"][0], trained["lam10"][0]))
    assert trained["lam10"][1]["steps"][0]["grad_barrier"] > 0


def test_heal_with_reg_nll_makes_no_barrier(tiny):
    tok = tiny[1]
    p = load_params("tiny", reg="nll", tau=0.0)
    model, log = H.heal(copy.deepcopy(tiny[0]), tok, _records(tok, 4), p, round_idx=0, history=[], progress=False)
    assert all(s["D"] == 0.0 and s["grad_barrier"] == 0.0 and not s["barrier_fired"] for s in log["steps"])
    assert isinstance(model, PeftModel) and model.active_adapters == ["r0"]


def test_non_finite_loss_raises_and_removes_the_half_trained_adapter(tiny):
    tok = tiny[1]
    plain = copy.deepcopy(tiny[0])
    with pytest.raises(RuntimeError, match="non-finite"):
        H.heal(plain, tok, _records(tok, 8), load_params("tiny", lr=1e30), round_idx=0, history=[], progress=False)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    b = _batch(tok)
    assert torch.equal(_logits(plain, b), _logits(tiny[0], b))
    # with history: the new adapter goes, the history stays active and untouched
    p = load_params("tiny", lr=1e30)
    model = _student(tiny, p)
    HI.freeze(model, ["r0"])
    before = _logits(model, b)
    with pytest.raises(RuntimeError, match="non-finite"):
        H.heal(model, tok, _records(tok, 8), p, round_idx=1, history=["r0"], progress=False)
    assert list(model.peft_config) == ["r0"] and model.active_adapters == ["r0"]
    assert torch.equal(_logits(model, b), before)


def test_warns_when_tau_sits_above_the_operating_kl(tiny):
    tok = tiny[1]
    p = load_params("tiny", reg="kl_rev", tau=1e6)
    with pytest.warns(UserWarning, match="never fired"):
        _, log = H.heal(copy.deepcopy(tiny[0]), tok, _records(tok, 4), p, round_idx=0, history=[], progress=False)
    assert not log["barrier_fired_any"]


def test_gradient_split_is_sampled_every_nth_and_the_last_step(tiny):
    tok = tiny[1]
    p = load_params("tiny", barrier_ref="base", reg="kl_rev", tau=0.0, lr=1e-2, heal_grad_every=3)
    _, log = H.heal(_student(tiny, p), tok, _records(tok, 8), p, round_idx=1, history=["r0"], progress=False)
    measured = [s["step"] for s in log["steps"] if not math.isnan(s["grad_nll"])]
    assert measured == [0, 3]  # 4 steps: every 3rd from 0, and the last
    assert all(math.isnan(s["pressure"]) for s in log["steps"] if s["step"] in (1, 2))


def test_cached_reference_states_give_the_reference_forward_pass(tiny):
    """The barrier reads the reference through the LM head on cached final hidden states: the same
    log-probs (and D) as a whole reference forward pass."""
    p = load_params("tiny", reg="kl_rev", kl_agg="rmse", spectral_lam=0.0)
    model = _student(tiny, p)
    model = HI.add_round_adapter(model, p, 1)
    randomize_lora(model, "r1", seed=3)
    b = _batch(tiny[1], n=3)
    with torch.no_grad(), HI.adapters(model, ["r0"]):
        full = H.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    cached = H.head_logprobs(model, H.batch_frozen_states(model, b, ["r0"], 0, check=True)[0])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    # per example (as heal keeps them) concatenates back to the batch's rows
    ex = H.encode_records(tiny[1], _records(tiny[1], 3))
    per, bottom = H.frozen_states(model, ex, ["r0"], 0, tiny[1].pad_token_id, 2)
    assert bottom == [None] * 3
    assert [len(h) for h in per] == [len(c) for _, c in ex]
    torch.testing.assert_close(H.head_logprobs(model, torch.cat(per)), full, atol=1e-5, rtol=0)


def test_a_bfloat16_models_heal_losses_stay_near_float32s():
    """The embedded default runs in bfloat16 on the CPU: its heal losses differ from float32's by
    rounding only."""
    from shl.models import load_model
    logs = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model("tiny-random", dtype, "cpu")
        p = load_params("tiny", dtype=dtype, reg="kl_rev", tau=0.0, lr=1e-2, heal_grad_every=1)
        _, logs[dtype] = H.heal(model, tok, _records(tok, 8), p, round_idx=0, history=[], progress=False)
    for a, b in zip(logs["float32"]["steps"], logs["bfloat16"]["steps"]):
        assert b["nll"] == pytest.approx(a["nll"], rel=0.02)
    assert logs["bfloat16"]["steps"][-1]["nll"] != logs["float32"]["steps"][-1]["nll"]  # it really ran in bf16


def test_the_adapter_is_the_same_whichever_steps_measure_the_gradients_terms(tiny):
    """The weights follow one backward pass of the total on every step; measuring the terms is an
    extra pass on the side, so every / every 3rd / no step measuring trains bit-identical adapters."""
    tok = tiny[1]
    trained = {}
    for key, over in {"every": dict(heal_grad_every=1), "third": dict(heal_grad_every=3),
                      "never": dict(heal_grad_norms=False)}.items():
        p = load_params("tiny", barrier_ref="base", reg="kl_rev", tau=0.0, lr=1e-2, **over)
        model, log = H.heal(_student(tiny, p), tok, _records(tok, 8), p, round_idx=1, history=["r0"], progress=False)
        trained[key] = (_lora_weights(model, "r1"), log)
    for key in ("third", "never"):
        assert all(torch.equal(a, b) for a, b in zip(trained["every"][0], trained[key][0])), key
        assert [s["nll"] for s in trained[key][1]["steps"]] == [s["nll"] for s in trained["every"][1]["steps"]]
    assert all(math.isnan(s["grad_nll"]) and math.isnan(s["grad_barrier"]) for s in trained["never"][1]["steps"])
    assert all(s["grad_barrier"] > 0 for s in trained["every"][1]["steps"])


def test_the_measured_terms_are_the_nll_and_barrier_gradients(tiny):
    """Step 0 starts from the same weights whatever the barrier's weight: its NLL share (total minus
    the measured barrier) must equal the gradient of an NLL-only heal, and the barrier's norm must
    scale with lam exactly."""
    tok = tiny[1]
    first = {}
    for key, over in {"nll": dict(reg="nll"), "lam5": dict(reg="kl_rev", lam=5.0), "lam10": dict(reg="kl_rev", lam=10.0)}.items():
        p = load_params("tiny", barrier_ref="base", tau=0.0, lr=1e-2, heal_grad_every=1, **over)
        _, log = H.heal(_student(tiny, p), tok, _records(tok, 8), p, round_idx=1, history=["r0"], progress=False)
        first[key] = log["steps"][0]
    for key in ("lam5", "lam10"):
        assert first[key]["grad_nll"] == pytest.approx(first["nll"]["grad_nll"], rel=1e-5)
    assert first["lam5"]["grad_barrier"] > 0
    assert first["lam10"]["grad_barrier"] == pytest.approx(2 * first["lam5"]["grad_barrier"], rel=1e-5)


def test_frozen_adapters_take_a_bfloat16_models_dtype_and_reload_identically(tmp_path):
    """On a bfloat16 model the trained adapter is frozen into bfloat16 (no float32 casts in every
    adapted layer at inference); saved and loaded back it gives the same logits."""
    from shl.models import load_model
    model, tok = load_model("tiny-random", "bfloat16", "cpu")
    p = load_params("tiny", dtype="bfloat16", lr=1e-2)
    model, _ = H.heal(model, tok, _records(tok, 4), p, round_idx=0, history=[], progress=False)
    assert {A.dtype for A, B, _ in HI.lora_pairs(model, "r0")} == {torch.bfloat16}
    b = _batch(tok)
    before = _logits(model, b)
    HI.save_adapter(model, "r0", tmp_path / "r0")
    fresh, _ = load_model("tiny-random", "bfloat16", "cpu")
    fresh = HI.load_adapters(fresh, {"r0": tmp_path / "r0"})
    assert {A.dtype for A, B, _ in HI.lora_pairs(fresh, "r0")} == {torch.bfloat16}
    assert torch.equal(_logits(fresh, b), before)


# --- the heal's speed mechanisms keep its numbers ----------------------------------------------

def _upper_band_student(tiny, p):
    """tiny's 2 layers with LoRA on layer 1 only (heal_band [0.5, 1]): layer 0 is the frozen bottom."""
    model = HI.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
    randomize_lora(model, "r0", seed=5)
    return model


def test_the_frozen_bottom_is_the_first_layer_with_an_adapter_unless_something_below_drops_out(tiny):
    p = load_params("tiny", heal_band=[0.5, 1.0])
    assert H.frozen_bottom(_upper_band_student(tiny, p)) == 1
    assert H.frozen_bottom(_student(tiny, load_params("tiny"))) == 0  # the default tiny band starts at 0
    model = _upper_band_student(tiny, p)
    HI.unwrap(model).model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.1))
    assert H.frozen_bottom(model) == 0


def test_a_pass_started_at_the_frozen_bottom_gives_the_whole_forward_and_its_gradient(tiny):
    """Float32: the log-probs and the adapter's gradient from layer 1's cached input (per example,
    re-padded as a training micro-batch pads them) equal a whole forward pass within 1e-5."""
    p = load_params("tiny", heal_band=[0.5, 1.0])
    model = _upper_band_student(tiny, p)
    tok = tiny[1]
    ex = H.encode_records(tok, _records(tok, 5))
    _, bottom = H.frozen_states(model, ex, None, 1, tok.pad_token_id, 2)
    assert [len(b) for b in bottom] == [len(q) + len(c) for q, c in ex]
    params = [w for A, B, _ in HI.lora_pairs(model, "r0") for w in (A, B)]
    idx = [4, 0, 2]  # another grouping than the one the states were read in
    batch = H.collate([ex[i] for i in idx], tok.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    whole = H.completion_logprobs(model, *args)
    started = H.completion_logprobs(model, *args, bottom=(1, H.bottom_batch([bottom[i] for i in idx])))
    torch.testing.assert_close(started, whole, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(whole.logsumexp(-1).sum() - whole.sum() / 1e3, params),
                    torch.autograd.grad(started.logsumexp(-1).sum() - started.sum() / 1e3, params)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert isinstance(HI.unwrap(model).model.layers[0], type(HI.unwrap(tiny[0]).model.layers[0]))  # restored


def test_the_frozen_bottom_check_fails_loudly_when_a_started_pass_differs(tiny):
    """A model whose forward does more between the embedding and the band than its decoder layers
    (here: a pre-hook that shifts layer 1's input, which a started pass applies a second time) is
    caught on the first batch instead of training on other numbers."""
    p = load_params("tiny", heal_band=[0.5, 1.0])
    model = _upper_band_student(tiny, p)
    HI.unwrap(model).model.layers[1].register_forward_pre_hook(lambda m, args: (args[0] + 1.0, *args[1:]))
    with pytest.raises(RuntimeError, match="started at decoder layer 1"):
        H.batch_frozen_states(model, _batch(tiny[1], 2), None, 1, check=True)


@pytest.mark.parametrize("reg", ["kl_rev", "nll"])
def test_the_heal_is_the_same_with_eager_attention_and_the_bottom_read_once(tiny, monkeypatch, reg):
    """Float32, 2 epochs: the heal as it runs (eager attention on the CPU, layer 0 read once, for the
    training steps and the held-out NLL) against each mechanism turned off and both off: every
    step's NLL and D and every epoch's held-out NLL within 1e-5, the adapters too."""
    tok = tiny[1]
    p = load_params("tiny", heal_band=[0.5, 1.0], reg=reg, tau=0.0, lr=1e-2, epochs=2)
    real_bottom, real_attention = H.frozen_bottom, H.train_attention
    runs = {}
    for key, (bottom_on, eager_on) in {"both": (True, True), "no_bottom": (False, True),
                                       "sdpa": (True, False), "neither": (False, False)}.items():
        monkeypatch.setattr(H, "frozen_bottom", real_bottom if bottom_on else (lambda m: 0))
        monkeypatch.setattr(H, "train_attention", real_attention if eager_on else (lambda m: None))
        model = HI.add_round_adapter(copy.deepcopy(tiny[0]), p, 0)
        randomize_lora(model, "r0", seed=5)
        HI.freeze(model, ["r0"])
        torch.manual_seed(p.seed + 1)  # heal draws r1's A from the same seed: its starting weights
        init = _lora_weights(HI.add_round_adapter(copy.deepcopy(model), p, 1, "r1"), "r1")
        model, log = H.heal(model, tok, _records(tok, 8), p, round_idx=1, history=["r0"], progress=False)
        runs[key] = (_lora_weights(model, "r1"), log["steps"], log["epochs"])
        assert HI.unwrap(model).config._attn_implementation == HI.unwrap(tiny[0]).config._attn_implementation
    assert real_attention(tiny[0]) == "eager" and real_bottom(_upper_band_student(tiny, p)) == 1
    ref_w, ref_steps, ref_epochs = runs["neither"]
    for key in ("both", "no_bottom", "sdpa"):
        w, steps, epochs = runs[key]
        assert [s["nll"] for s in steps] == pytest.approx([s["nll"] for s in ref_steps], abs=1e-5), key
        held = [e["heldout_nll"] for e in epochs]
        assert all(math.isfinite(h) for h in held) and held == pytest.approx([e["heldout_nll"] for e in ref_epochs],
                                                                             abs=1e-5), key
        assert [s["D"] for s in steps] == pytest.approx([s["D"] for s in ref_steps], abs=1e-5), key
        # AdamW divides by sqrt(v): a gradient component near 0 turns float32 rounding into a step of
        # up to lr, so the adapters are compared as a whole: apart by < 1e-3 of how far training moved them
        moved = torch.linalg.vector_norm(torch.cat([(a - i).flatten() for a, i in zip(ref_w, init)]))
        apart = torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(w, ref_w)]))
        assert apart < 1e-3 * moved, key


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_a_started_pass_equals_the_whole_forward_on_the_gpu_presets_architectures(tiny, arch):
    """Qwen3 and gemma-3 (sliding-window layers under a window shorter than the batch, so a shifted
    layer index would read the wrong mask) start at the band's first layer with the same log-probs."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM
    tok = tiny[1]
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=4, sliding_window_pattern=2,
                                                   layer_types=["sliding_attention", "full_attention"] * 2))
    model.eval()
    p = load_params("tiny", heal_band=[0.5, 1.0])
    model = HI.add_round_adapter(model, p, 0)
    randomize_lora(model, "r0", seed=2, scale=0.1)
    assert H.frozen_bottom(model) == 2
    b = _batch(tok, 3)
    assert b["input_ids"].shape[1] > 4  # longer than the window
    _, bottom = H.batch_frozen_states(model, b, None, 2, check=True)
    whole = H.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    started = H.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"], bottom=(2, bottom))
    torch.testing.assert_close(started, whole, atol=1e-5, rtol=0)


# --- the LM head a few rows at a time (head_terms) --------------------------------------------

def _reference_terms(model, states, targets, ref_states, reg):
    """Per-position NLL and KL by the full-vocabulary log-softmax of `head_logprobs`, autograd's way."""
    logp = H.head_logprobs(model, states)
    nll = -logp.gather(-1, targets[:, None])[:, 0]
    if reg == "nll":
        return nll, torch.zeros_like(nll)
    with torch.no_grad():
        logp_ref = H.head_logprobs(model, ref_states)
    return nll, H.per_position_kl(logp, logp_ref, reg)


@pytest.mark.parametrize("cap", [None, 2.0], ids=["no_cap", "softcap"])
@pytest.mark.parametrize("reg", ["kl_rev", "kl_fwd", "nll"])
def test_head_terms_equal_the_full_vocabulary_log_softmax_and_its_gradient(tiny, reg, cap):
    """Float32: the per-position NLL and KL and their gradient in the final states, under upstream
    weights that differ per position (so each row's scaling is checked), within 1e-5, for chunks of
    3 rows (a last chunk shorter than the others) and for all rows at once."""
    model = copy.deepcopy(tiny[0])
    model.config.final_logit_softcapping = cap
    g = torch.Generator().manual_seed(0)
    n, hidden = 11, model.config.hidden_size
    states = (torch.randn(n, hidden, generator=g)).requires_grad_()
    ref_states = torch.randn(n, hidden, generator=g)
    targets = torch.randint(0, model.config.vocab_size, (n,), generator=g)
    w_nll, w_kl = torch.rand(n, generator=g), torch.rand(n, generator=g)
    want_nll, want_kl = _reference_terms(model, states, targets, ref_states, reg)
    want_grad, = torch.autograd.grad((w_nll * want_nll).sum() + (w_kl * want_kl).sum(), states)
    assert want_kl.abs().max() > 0.01 or reg == "nll"
    for rows in (3, n):
        got_nll, got_kl = H._HeadTerms.apply(states, None if reg == "nll" else ref_states, targets,
                                             model.lm_head.weight.detach(), None, cap, reg, rows)
        got_grad, = torch.autograd.grad((w_nll * got_nll).sum() + (w_kl * got_kl).sum(), states)
        torch.testing.assert_close(got_nll, want_nll, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_kl, want_kl, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=0)


def test_the_heal_loss_is_the_full_vocabulary_one(tiny):
    """Float32, a live rmse barrier on a student with history: heal_loss's terms and its gradient in
    every trainable weight equal the loss written on `completion_logprobs` and `head_logprobs`."""
    p = load_params("tiny", reg="kl_rev", kl_agg="rmse", lam=1.0, tau=0.0, spectral_lam=0.0)
    model = _student(tiny, p)
    b = _batch(tiny[1], 3)
    ref = H.batch_frozen_states(model, b, [], 0, check=True)[0]
    t = H.heal_loss(model, b, p, 0, "r0", ref)
    logp = H.completion_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    nll = H.completion_nll(logp, b["input_ids"], b["loss_mask"])
    kl = H.per_position_kl(logp, H.head_logprobs(model, ref), "kl_rev")
    total = nll + H.lam_eff(p, 0) * torch.relu(H.aggregate_kl(kl, "rmse") - p.tau)
    assert t["barrier"].item() > 0.01
    torch.testing.assert_close(t["nll"], nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(t["kl"], kl.detach(), atol=1e-5, rtol=0)
    for got, want in zip(_grads(t["total"], model), _grads(total, model)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_decoder_states_check_fails_loudly_when_they_are_not_the_heads_input(tiny, monkeypatch):
    p = load_params("tiny")
    model = _student(tiny, p)
    real = H.completion_states
    monkeypatch.setattr(H, "completion_states", lambda *a, **k: real(*a, **k) * 1.5)
    with pytest.raises(RuntimeError, match="decoder's final hidden states"):
        H.batch_frozen_states(model, _batch(tiny[1]), [], 0, check=True)
    # reg=nll with adapters from layer 0 keeps nothing from the pass, and still checks one batch
    examples = H.encode_records(tiny[1], _records(tiny[1], 4))
    with pytest.raises(RuntimeError, match="decoder's final hidden states"):
        H.frozen_states(model, examples, None, 0, tiny[1].pad_token_id, 2)
