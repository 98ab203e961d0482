import pytest
import torch
from peft import LoraConfig, get_peft_model

from shl import steer
from shl.models import chat_prompt
from shl.steer import Vector


def _random_vector(model, layers, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Vector({l: scale * torch.randn(model.config.hidden_size, generator=g) for l in layers})


def _ids(tok, text="Tell me about the sea."):
    return tok(chat_prompt(tok, text), return_tensors="pt", add_special_tokens=False).input_ids


def test_hook_adds_exactly_coeff_times_v_at_the_chosen_layer(tiny):
    model, tok = tiny
    ids = _ids(tok)
    vec = _random_vector(model, [0])
    with steer.capture(model, [0, 1]) as plain:
        model(ids)
    plain = dict(plain)
    with steer.steer(model, vec, 0.7), steer.capture(model, [0, 1]) as steered:
        model(ids)
    torch.testing.assert_close(steered[0] - plain[0], (0.7 * vec.layers[0]).expand_as(plain[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(steered[1], plain[1])  # the later layer sees the change


def test_outputs_are_bit_identical_after_exit_even_after_an_exception(tiny):
    model, tok = tiny
    ids = _ids(tok)
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with steer.steer(model, _random_vector(model, [0, 1]), 3.0):
                assert not torch.equal(model(ids).logits, before)
                raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, before)
    assert all(not layer._forward_hooks for layer in steer.decoder_layers(model))


def test_extraction_reads_the_last_prompt_token_under_left_padding(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, x, "Be brief.") for x in ["Hi", "What is the tallest mountain in Africa, and how tall is it?", "Plan a picnic"]]
    batched = steer.last_token_states(model, tok, prompts, [0, 1], batch_size=3, progress=False)
    for i, p in enumerate(prompts):
        single = steer.last_token_states(model, tok, [p], [0, 1], batch_size=1, progress=False)
        for l in (0, 1):
            torch.testing.assert_close(batched[l][i], single[l][0], atol=1e-5, rtol=1e-5)


def test_prefix_cached_early_stopped_states_equal_a_plain_forward_pass(tiny):
    """last_token_states runs the shared prefix once and stops after the deepest layer it reads:
    the same states as one whole unpadded forward pass per prompt."""
    model, tok = tiny
    prompts = [chat_prompt(tok, x, "You are a careful, kind assistant.") for x in ["Hi", "Plan a picnic for six", "Why?"]]
    fast = steer.last_token_states(model, tok, prompts, [0], batch_size=2, progress=False)
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p, add_special_tokens=False).input_ids])
        with torch.no_grad(), steer.capture(model, [0]) as seen:
            model(ids)
        torch.testing.assert_close(fast[0][i], seen[0][0, -1], atol=1e-5, rtol=1e-5)


def test_extract_is_the_mean_difference_of_pos_and_neg_states(tiny):
    model, tok = tiny
    contexts = ["Hi", "Plan a picnic", "Fix my bike chain"]
    vec = steer.extract(model, tok, "You are cheerful.", "You are gloomy.", contexts, [1], progress=False)
    h_pos = steer.last_token_states(model, tok, [chat_prompt(tok, x, "You are cheerful.") for x in contexts], [1], progress=False)
    h_neg = steer.last_token_states(model, tok, [chat_prompt(tok, x, "You are gloomy.") for x in contexts], [1], progress=False)
    torch.testing.assert_close(vec.layers[1], (h_pos[1] - h_neg[1]).mean(0))


def test_steering_is_active_during_cached_generation(tiny):
    model, tok = tiny
    ids = _ids(tok)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(ids, **gen)
    with steer.steer(model, _random_vector(model, [0, 1]), 8.0):
        steered = model.generate(ids, **gen)
    assert not torch.equal(plain[0, ids.shape[1]:], steered[0, ids.shape[1]:])
    assert torch.equal(model.generate(ids, **gen), plain)


def test_works_on_a_peft_wrapped_model_and_in_bf16(tiny):
    model, tok = tiny
    import copy
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert steer.decoder_layers(peft_model) is not None and len(steer.decoder_layers(peft_model)) == 2
    ids = _ids(tok)
    vec = _random_vector(model, [1])
    for m in (peft_model, copy.deepcopy(model).to(torch.bfloat16)):
        with steer.capture(m, [1]) as plain:
            m(ids)
        plain = dict(plain)
        with steer.steer(m, vec, 0.5), steer.capture(m, [1]) as steered:
            m(ids)
        expected = (0.5 * vec.layers[1]).to(plain[1].dtype).expand_as(plain[1])
        torch.testing.assert_close(steered[1] - plain[1], expected, atol=0.05 if plain[1].dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_band_layers_maps_fractions_of_depth():
    assert steer.band_layers(30, [0.5, 0.7]) == list(range(15, 21))
    assert steer.band_layers(2, [0.0, 1.0]) == [0, 1]
    assert steer.band_layers(30, [0.99, 1.0]) == [29]


def test_cosine_per_layer_and_flat():
    a = Vector({0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 2.0])})
    b = Vector({0: torch.tensor([2.0, 0.0]), 1: torch.tensor([0.0, -1.0]), 5: torch.ones(2)})
    per, flat = steer.cosine(a, b)
    assert per == pytest.approx({0: 1.0, 1: -1.0})
    assert flat == pytest.approx((2 - 2) / (5 ** 0.5 * 5 ** 0.5))


def test_vector_save_load_roundtrip(tmp_path, tiny):
    model, _ = tiny
    vec = _random_vector(model, [0, 1])
    vec.meta["pos"] = "x"
    vec.save(tmp_path / "v.pt")
    back = Vector.load(tmp_path / "v.pt")
    assert back.meta == vec.meta and all(torch.equal(back.layers[l], vec.layers[l]) for l in (0, 1))


def test_student_vector_is_zero_with_a_fresh_adapter(tiny):
    model, tok = tiny
    import copy
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    prompts = [chat_prompt(tok, x) for x in ["Hi", "Plan a picnic"]]
    h_student = steer.last_token_states(peft_model, tok, prompts, [0, 1], progress=False)
    with peft_model.disable_adapter():
        h_base = steer.last_token_states(peft_model, tok, prompts, [0, 1], progress=False)
    vec = steer.student_vector(h_student, h_base)
    assert all(v.abs().max() < 1e-6 for v in vec.layers.values())  # LoRA B starts at zero


def test_calibration_hits_the_target_kl(tiny):
    model, tok = tiny
    vec = _random_vector(model, [0], scale=0.5)
    prompts = [chat_prompt(tok, x) for x in ["Hi", "Plan a picnic"]]
    target = steer.kl_p95(model, tok, vec, 3.0, prompts) / 2  # reachable on this model, whatever its scale
    coeff, trace = steer.calibrate(model, tok, vec, prompts, target=target, iters=16)
    assert 0 < coeff < 3.0
    assert steer.kl_p95(model, tok, vec, coeff, prompts) == pytest.approx(target, rel=0.02)


# --- extraction methods --------------------------------------------------------------------------

def _planted_pairs(n=200, h=32, seed=0):
    """Paired states whose differences have mean ~0 but vary along a planted unit direction u:
    3 of 4 pairs differ by +1 u, 1 of 4 by -3 u (so the mean along u is 0), plus small noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(h, generator=g)
    u /= u.norm()
    amount = torch.where(torch.arange(n) % 4 == 0, -3.0, 1.0)  # majority +1, mean 0
    h_neg = torch.randn(n, h, generator=g)
    h_pos = h_neg + amount[:, None] * u + 0.05 * torch.randn(n, h, generator=g)
    return h_pos, h_neg, u


def test_pca_recovers_a_planted_direction_with_the_majority_sign_where_the_mean_difference_cannot():
    h_pos, h_neg, u = _planted_pairs()
    assert abs((h_pos - h_neg).mean(0) @ u) < 0.05  # the planted differences cancel in the mean
    v = steer.pca_direction(h_pos, h_neg)
    assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.dot(v, u).item() > 0.99  # the axis, with the sign most pairs point along
    m = steer.mean_diff_direction(h_pos, h_neg)
    assert abs(torch.nn.functional.cosine_similarity(m, u, dim=0).item()) < 0.5  # noise, not the axis
    # the same pairs swapped: the sign follows pos - neg
    assert torch.dot(steer.pca_direction(h_neg, h_pos), u).item() < -0.99


def test_pca_centres_the_differences_so_a_constant_offset_is_not_the_axis():
    h_pos, h_neg, u = _planted_pairs()
    w = torch.zeros_like(u)
    w[0] = 1.0
    w -= (w @ u) * u
    w /= w.norm()
    v = steer.pca_direction(h_pos + 10.0 * w, h_neg)  # every pair also differs by a big constant 10 w
    assert torch.dot(v, u).item() > 0.99 and abs(torch.dot(v, w).item()) < 0.05


def test_pca_sign_ties_go_to_the_largest_projection():
    u = torch.tensor([1.0, 0.0, 0.0])
    h_neg = torch.zeros(4, 3)
    h_pos = torch.stack([2 * u, 2 * u, -1 * u, -5 * u])  # two for, two against; the largest is against
    assert steer.pca_direction(h_pos, h_neg)[0].item() == pytest.approx(-1.0, abs=1e-6)


def test_lda_discounts_a_direction_the_states_vary_along():
    """The class means differ by u + n, but n is also where the states vary most from context to
    context: mean_diff sits half-way (cos 0.71 with u), the discriminant points along u."""
    g = torch.Generator().manual_seed(1)
    hdim, count = 16, 400
    u, nuis = torch.eye(hdim)[0], torch.eye(hdim)[1]
    context = 5.0 * torch.randn(count, 1, generator=g) * nuis  # topic variation, shared by both prompts
    h_neg = context + 0.1 * torch.randn(count, hdim, generator=g)
    h_pos = context + u + nuis + 0.1 * torch.randn(count, hdim, generator=g)
    h_pos = h_pos + 5.0 * torch.randn(count, 1, generator=g) * nuis  # pos's own spread along n too
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    assert cos(steer.mean_diff_direction(h_pos, h_neg), u) < 0.8
    assert cos(steer.lda_direction(h_pos, h_neg), u) > 0.95


def test_ledoit_wolf_is_well_conditioned_with_fewer_rows_than_dimensions():
    x = torch.randn(10, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x - x.mean(0)
    shrunk = steer.ledoit_wolf(x)
    assert torch.linalg.matrix_rank(x.T @ x) < 50 and torch.linalg.eigvalsh(shrunk).min() > 0
    torch.testing.assert_close(torch.trace(shrunk), torch.trace(x.T @ x / 10))  # shrinks toward the same scale


@pytest.mark.parametrize("method", sorted(steer.METHODS))
def test_every_method_extracts_steers_and_calibrates_and_records_its_method(tiny, tmp_path, method):
    model, tok = tiny
    contexts = ["Hi", "Plan a picnic", "Fix my bike chain", "What is rain?"]
    vec = steer.extract(model, tok, "You are cheerful.", "You are gloomy.", contexts, [0, 1], progress=False, method=method)
    mean = steer.extract(model, tok, "You are cheerful.", "You are gloomy.", contexts, [0, 1], progress=False)
    assert vec.meta["method"] == method
    for l in (0, 1):  # every method carries the mean difference's norm, so raw coefficients are comparable
        assert vec.layers[l].norm().item() == pytest.approx(mean.layers[l].norm().item(), rel=1e-5)
    vec.save(tmp_path / "v.pt")
    assert steer.Vector.load(tmp_path / "v.pt").meta["method"] == method
    ids = _ids(tok)
    with torch.no_grad():
        plain = model(ids).logits
        with steer.steer(model, vec, 50.0):
            assert not torch.allclose(model(ids).logits, plain)
    prompts = [chat_prompt(tok, x) for x in contexts[:2]]
    coeff, _ = steer.calibrate(model, tok, vec, prompts, target=0.005)
    assert steer.kl_p95(model, tok, vec, coeff, prompts) == pytest.approx(0.005, rel=0.05)


def test_an_unknown_method_fails_before_any_forward_pass(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown steer_method 'svd'"):
        steer.extract(model, tok, "a", "b", ["Hi"], [0], progress=False, method="svd")


def test_the_params_choices_are_the_methods_shl_steer_implements():
    from shl.params import FIELDS, STEER_METHODS
    assert set(STEER_METHODS) == set(steer.METHODS)
    assert FIELDS["steer_method"].metadata["choices"] == list(STEER_METHODS)


@pytest.mark.slow
def test_on_the_embedded_model_every_method_points_the_way_of_pos_minus_neg(embedded):
    """The sign rule of pca and lda (the majority of the pairs) agrees with the mean difference on
    real paired states, at every layer of the band."""
    from shl import demos
    from shl.params import load_params
    model, tok = embedded
    p = load_params("default", n_contexts=32)
    demo, contexts = demos.load_demo(p), demos.load_contexts(p)
    layers = steer.band_layers(steer.num_layers(model), p.steer_band)
    h_pos = steer.last_token_states(model, tok, [chat_prompt(tok, x, demo.pos) for x in contexts], layers, progress=False)
    h_neg = steer.last_token_states(model, tok, [chat_prompt(tok, x, demo.neg) for x in contexts], layers, progress=False)
    for layer in layers:
        mean = steer.mean_diff_direction(h_pos[layer], h_neg[layer])
        for method in ("pca", "lda"):
            v = steer.METHODS[method](h_pos[layer], h_neg[layer])
            assert torch.nn.functional.cosine_similarity(v, mean, dim=0).item() > 0, (method, layer)
