"""The loop's speed-ups give the numbers the slow paths give (issue 11): a frozen adapter stack
read merged into the weights, the probe's shared-prompt continuations, a contiguous LM-head input.
All in float32 on the tiny model, where the paths must agree to 1e-4. And the allocator setting
that keeps freed memory does what it says."""

import copy
import platform
import resource

import numpy as np
import pytest
import torch

from conftest import randomize_lora
from shl import history as HI
from shl import mfv, steer
from shl.generate import generate_texts
from shl.models import chat_prompt, continuation_logprobs, keep_freed_memory, last_token_logprobs
from shl.params import load_params


def _stack(tiny, trainable_last=False):
    """A copy of tiny with two random frozen adapters r0, r1 active (and a trainable r2 on top)."""
    p = load_params("tiny")
    model = copy.deepcopy(tiny[0])
    for k in range(2 + trainable_last):
        model = HI.add_round_adapter(model, p, k)
        randomize_lora(model, f"r{k}", seed=k + 1)
        if k < 2:
            HI.freeze(model, [f"r{k}"])
    return model


def _merged_and_live(monkeypatch, fn, model):
    """fn() read merged, then live; checks that the first did merge and the second did not."""
    layer = next(m for m in model.modules() if isinstance(m, HI.LoraLayer))
    seen = []
    handle = layer.get_base_layer().register_forward_pre_hook(
        lambda m, a: seen.append(getattr(model, "_shl_merged", False)))
    out = {}
    try:
        for flag in (True, False):
            monkeypatch.setattr(HI, "MERGE_READS", flag)
            seen.clear()
            out[flag] = fn()
            assert seen and all(x == flag for x in seen), f"MERGE_READS={flag}: merged reads {set(seen)}"
    finally:
        handle.remove()
    return out[True], out[False]


def test_a_merged_frozen_stack_evaluates_as_the_live_stack(tiny, monkeypatch):
    model, tok = _stack(tiny), tiny[1]
    with HI.adapters(model, []):
        base = mfv.evaluate(model, tok, n=14, progress=False).summary
    merged, live = _merged_and_live(monkeypatch, lambda: mfv.evaluate(model, tok, n=14, progress=False).summary,
                                    model)
    keys = [k for k, v in live.items() if isinstance(v, float) and k != "seconds" and np.isfinite(v)]
    # within 1e-4, relative for the large ones (the random stack's json perplexity is ~5e4)
    assert keys and max(abs(merged[k] - live[k]) / max(1.0, abs(live[k])) for k in keys) < 1e-4
    # and the adapters matter: the stack is not read as the base model
    assert max(abs(merged[k] - base[k]) for k in keys if k.endswith("_nats")) > 1e-3


def test_a_merged_stack_generates_and_reads_hidden_states_as_the_live_one(tiny, monkeypatch):
    model, tok = _stack(tiny), tiny[1]
    prompts = [chat_prompt(tok, f"Say something about {w}.") for w in ("rivers", "tea", "a long winter")]
    texts = _merged_and_live(monkeypatch, lambda: generate_texts(model, tok, prompts, 12, batch_size=2, progress=False),
                             model)
    assert texts[0] == texts[1]
    states = _merged_and_live(monkeypatch, lambda: steer.last_token_states(model, tok, prompts, [0, 1], 2, False),
                              model)
    # relative to the layer's scale (the random stack drives its states to ~1e2)
    assert all((states[0][l] - states[1][l]).abs().max() < 1e-5 * states[1][l].abs().max() for l in (0, 1))


def test_merged_puts_the_original_weights_back_and_refuses_adapter_switches(tiny):
    model = _stack(tiny)
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        live = model(input_ids=ids).logits
        with HI.merged(model):
            assert all(m.disable_adapters for m in model.modules() if isinstance(m, HI.LoraLayer))
            inside = model(input_ids=ids).logits
            for switch in (lambda: HI.set_active(model, ["r0"]), lambda: HI.adapters(model, []).__enter__()):
                with pytest.raises(RuntimeError, match="inside merged"):
                    switch()
        after = model(input_ids=ids).logits
    assert torch.allclose(inside, live, atol=1e-5) and torch.equal(after, live)
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())
    assert model.active_adapters == ["r0", "r1"]


def _first_base_weight(model):
    return next(m for m in model.modules() if isinstance(m, HI.LoraLayer)).get_base_layer().weight


def test_merged_reads_through_peft_while_an_adapter_trains_adapters_are_off_or_weights_are_bf16(tiny):
    model = _stack(tiny, trainable_last=True)
    weight = _first_base_weight(model)
    with HI.merged(model):  # r2 has requires_grad: its gradient must flow through the LoRA layer
        assert _first_base_weight(model) is weight
    with HI.adapters(model, []), HI.merged(model):
        assert _first_base_weight(model) is weight
    frozen = _stack(tiny)
    weight = _first_base_weight(frozen)
    with HI.merged(frozen):
        assert _first_base_weight(frozen) is not weight  # float32, all frozen: merged
    bf16 = _stack((copy.deepcopy(tiny[0]).to(torch.bfloat16), tiny[1]))
    weight = _first_base_weight(bf16)
    with HI.merged(bf16):  # bfloat16 would round the update to W's precision: read live
        assert _first_base_weight(bf16) is weight and not any(
            m.disable_adapters for m in bf16.modules() if isinstance(m, HI.LoraLayer))
        # switching adapters is refused all the same, so a bf16 run fails where a float32 one would
        with pytest.raises(RuntimeError, match="inside merged"):
            HI.set_active(bf16, ["r0"])
    HI.set_active(bf16, ["r0", "r1"])  # and allowed again after


def test_shared_prompt_continuations_match_the_joined_reads(tiny):
    model, tok = tiny
    vocab = range(5, 200)
    g = np.random.default_rng(0)
    prompts = [list(g.choice(vocab, size=n)) for n in (7, 12, 3)]
    # prompt 0 is followed five times, 1 twice, 2 once; lengths differ, batches cut across groups;
    # at batch size 1 the one-token continuations are a sub-batch of their own
    pairs = [(0, 4), (1, 1), (0, 2), (2, 6), (0, 1), (1, 3), (0, 5), (0, 2)]
    P = [[int(x) for x in prompts[i]] for i, _ in pairs]
    C = [[int(x) for x in g.choice(vocab, size=n)] for _, n in pairs]
    joined = last_token_logprobs(model, [a + b for a, b in zip(P, C)], [len(c) for c in C], tok.pad_token_id, 3)
    for bs in (2, 1):
        shared = continuation_logprobs(model, P, C, tok.pad_token_id, batch_size=bs)
        assert [len(x) for x in shared] == [len(c) for c in C]
        assert max((a - b).abs().max().item() for a, b in zip(joined, shared)) < 1e-4


def test_the_lm_head_reads_kept_positions_as_the_full_forward_does(tiny):
    model, _ = tiny
    head = model.get_output_embeddings()
    assert getattr(head, "_shl_contiguous", False), "load_model did not make the head's input contiguous"
    contiguous = []  # a hook registered after load_model's sees the input it passes on
    handle = head.register_forward_pre_hook(lambda m, a: contiguous.append(a[0].is_contiguous()))
    ids = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits[:, -4:]
            kept = model(input_ids=ids, logits_to_keep=4).logits
    finally:
        handle.remove()
    assert contiguous == [True, True]
    assert torch.allclose(full, kept, atol=1e-5)


@pytest.mark.parametrize("reg,split", [("nll", True), ("kl_rev", True), ("kl_rev", False)])
def test_a_heal_steps_gradient_is_the_mean_of_its_micro_batches_full_losses(tiny, monkeypatch, reg, split):
    """The spectral term is computed once per optimizer step, not once per micro-batch: the first
    step's (pre-clip) gradient must still be that of the mean of each micro-batch's whole loss."""
    from shl import heal as H
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    p = load_params("tiny", reg=reg, tau=0.0, spectral_lam=0.5, train_batch_size=2, grad_accum=3, epochs=1,
                    heldout_frac=0.0, lr=1e-3, heal_grad_norms=split)
    records = [{"chat_prompt": chat_prompt(tok, f"Tell me about thing {i}."), "completion": f"Thing {i} is red."}
               for i in range(6)]
    # heal's own start: its seed, its fresh adapter, its order of the examples
    torch.manual_seed(p.seed)
    ref_model = HI.add_round_adapter(copy.deepcopy(model), p, 0)
    with torch.no_grad():  # a non-zero B, so the spectral term has a gradient in A and B
        for A, B, _ in HI.lora_pairs(ref_model, "r0"):
            B.copy_(0.05 * torch.randn(B.shape, generator=torch.Generator().manual_seed(3)))
    init = {n: q.detach().clone() for n, q in ref_model.named_parameters() if "lora_" in n}
    train, _ = H.split_heldout(records, p.heldout_frac, p.seed)  # one held out even at frac 0
    ex = H.encode_records(tok, train)
    order = torch.randperm(len(ex), generator=torch.Generator().manual_seed(p.seed)).tolist()
    params = [w for A, B, _ in HI.lora_pairs(ref_model, "r0") for w in (A, B)]
    ref = H.frozen_states(ref_model, ex, [], 0, tok.pad_token_id, 2)[0] if reg != "nll" else None
    losses = []
    for i in range(0, len(ex), 2):  # micro-batches of 2, 2 and 1: one step of grad_accum 3
        idx = order[i:i + 2]
        batch = H.collate([ex[j] for j in idx], tok.pad_token_id)
        losses.append(H.heal_loss(ref_model, batch, p, 0, "r0", torch.cat([ref[j] for j in idx]) if ref else None)["total"])
    want = torch.linalg.vector_norm(torch.stack([g.norm() for g in torch.autograd.grad(torch.stack(losses).mean(), params)]))

    # heal from the same start: wrap, then give its fresh adapter the same weights before training
    real_add = HI.add_round_adapter

    def add_then_copy(m, *a, **kw):
        m = real_add(m, *a, **kw)
        with torch.no_grad():
            for n, q in m.named_parameters():
                if n in init:
                    q.copy_(init[n])
        return m

    monkeypatch.setattr(H, "add_round_adapter", add_then_copy)
    _, log = H.heal(model, tok, records, p, 0, [], progress=False)
    assert abs(log["steps"][0]["grad_norm"] - want.item()) < 1e-5 * max(1.0, want.item())
    assert log["steps"][0]["spectral"] > 0


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_vocab_sized_tensor_is_reused_without_faulting_its_pages_in_again():
    """A heal step frees and re-allocates [N, V] float32 tensors of ~64 MB. glibc's default maps
    each one fresh (15,552 page faults of 4 KiB every time); after keep_freed_memory a re-allocation
    reuses the freed pages."""
    assert keep_freed_memory()
    shape = (324, 49152)  # the default heal micro-batch's completion positions x the embedded vocabulary
    for _ in range(2):  # allocated, touched, freed: the heap settles after the first reuse
        torch.empty(shape).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(shape).fill_(2.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000, f"{faults} page faults re-allocating a freed 64 MB tensor"


# --- evals that start at the first layer anything changed (shl.models.bottom_reads) -------------

def _eval_numbers(res):
    """Every number an eval leaves: its summary (seconds aside) and its per-row and probe rows."""
    summary = {k: v for k, v in res.summary.items() if k != "seconds"}
    return summary, res.rows, res.probe_rows


class _LayerCalls:
    """Counts the forward passes of one decoder layer without a hook (a hook is a change)."""

    def __init__(self, monkeypatch, layer):
        self.n, cls, real = 0, type(layer), type(layer).forward

        def forward(this, *a, **kw):
            self.n += this is layer
            return real(this, *a, **kw)
        monkeypatch.setattr(cls, "forward", forward)


def _replay_model(tiny, arch="llama", dtype=torch.float32):
    """A model in eval mode, the eval kwargs of the tiny preset with its heal and steering bands
    moved up, and the layers they start at: both layer 1 of 2 (tiny Llama), or layer 1 and 2 of 4
    (tiny Qwen3 and gemma-3: two recorded layers)."""
    if arch == "llama":
        return copy.deepcopy(tiny[0]).to(dtype).eval(), load_params("tiny", heal_band=[0.5, 1.0], steer_band=[0.5, 1.0]), 1, 1
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM
    common = dict(vocab_size=len(tiny[1]), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tiny[1].pad_token_id)
    torch.manual_seed(0)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:  # sliding-window layers below and above the bands (a window the eval's prompts stay inside: past
        # it the eval's option passes cannot crop the cache back, replayed or not)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=512, sliding_window_pattern=2,
                                                   layer_types=["sliding_attention", "full_attention"] * 2))
    return model.to(dtype).eval(), load_params("tiny", heal_band=[0.25, 1.0], steer_band=[0.5, 1.0]), 1, 2


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen3", torch.float32),
                                        ("gemma3", torch.float32)])
def test_an_eval_replayed_from_the_recorded_layer_gives_the_same_numbers_bit_for_bit(tiny, monkeypatch, arch, dtype):
    """The base eval records the input of the bands' first layers in every pass. Steered (on the
    steering band's first layer's output), the next eval starts at that layer; with an adapter in
    the heal band too, at the heal band's first layer (the layers below never run). Each leaves
    exactly the numbers of a whole eval: summary, rows and probe rows."""
    model, p, heal_first, steer_first = _replay_model(tiny, arch, dtype)
    tok = tiny[1]
    kw = mfv.eval_kwargs(p)
    assert kw["replay_bands"] == [p.heal_band, p.steer_band] and kw["probe"]
    layers = HI.decoder_layers(model)
    calls = {L: _LayerCalls(monkeypatch, layers[L]) for L in range(steer_first)}
    base = mfv.evaluate(model, tok, progress=False, **kw)  # records
    vector = steer.Vector({steer_first: torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))})

    def replayed_and_whole(skipped: int):
        for c in calls.values():
            c.n = 0
        replayed = mfv.evaluate(model, tok, progress=False, **kw)
        assert all(calls[L].n == 0 for L in range(skipped)), "the replayed eval ran a layer below the recorded one"
        assert all(calls[L].n > 0 for L in range(skipped, steer_first)), "a layer the replay needs did not run"
        whole = mfv.evaluate(model, tok, progress=False, **{**kw, "replay_bands": None})
        assert calls[0].n > 0
        assert _eval_numbers(replayed) == _eval_numbers(whole)
        return replayed

    with steer.steer(model, vector, 0.5):
        steered = replayed_and_whole(steer_first)
    model = HI.add_round_adapter(model, p, 0)
    randomize_lora(model, "r0", seed=4, scale=0.05)
    HI.freeze(model, ["r0"])
    model.eval()
    with steer.steer(model, vector, 0.5):
        both = replayed_and_whole(heal_first)
    # the steering and the adapter are read: not the base model's numbers
    assert steered.summary["care_nats"] != base.summary["care_nats"] != both.summary["care_nats"]


def test_a_replay_stands_down_when_what_computes_the_recorded_input_changed(tiny, monkeypatch):
    """A hook below the recorded layer, a pre-hook on it, a weight below it changed in place or
    written through `.data` (which leaves the tensor's version as it was): each makes the eval run
    whole (and read the change), never replay a stale input; the next eval records anew and replays
    what it recorded."""
    model, p, first, _ = _replay_model(tiny)
    tok = tiny[1]
    kw = mfv.eval_kwargs(p)
    whole_kw = {**kw, "replay_bands": None}
    below = _LayerCalls(monkeypatch, HI.decoder_layers(model)[0])
    mfv.evaluate(model, tok, progress=False, **kw)  # records
    layer0, layer1 = HI.decoder_layers(model)[0], HI.decoder_layers(model)[1]
    w = layer0.mlp.down_proj.weight
    saved = w.detach().clone()

    def shift(m, args):
        return (args[0] + 0.5, *args[1:])

    for change in ("hook below", "pre-hook on it", "weight in place", "weight through .data"):
        undo = None
        if change == "weight in place":
            with torch.no_grad():
                w.mul_(1.5)
        elif change == "weight through .data":
            version = w._version
            w.data.mul_(0.5)
            assert w._version == version  # what the fingerprint's sum is there for
        else:
            undo = (layer0 if change == "hook below" else layer1).register_forward_pre_hook(shift).remove
        try:
            below.n = 0
            changed = mfv.evaluate(model, tok, progress=False, **kw)
            assert below.n > 0, change
            assert _eval_numbers(changed) == _eval_numbers(mfv.evaluate(model, tok, progress=False, **whole_kw)), change
            below.n = 0
            again = mfv.evaluate(model, tok, progress=False, **kw)  # hooks: run whole again; weights: replayed
            assert (below.n > 0) == (undo is not None), change
            assert _eval_numbers(again) == _eval_numbers(changed), change
        finally:
            if undo:
                undo()
    w.data.copy_(saved)
    below.n = 0
    back = mfv.evaluate(model, tok, progress=False, **kw)  # the weight put back through .data: a new recording
    assert below.n > 0
    below.n = 0
    assert _eval_numbers(mfv.evaluate(model, tok, progress=False, **kw)) == _eval_numbers(back) and below.n == 0
    assert _eval_numbers(back) == _eval_numbers(mfv.evaluate(model, tok, progress=False, **whole_kw))


def test_nothing_is_recorded_for_a_model_that_changes_the_embedding_before_the_first_layer(tiny, monkeypatch):
    """Granite multiplies the embedding's output before layer 0: a pass started at a recorded layer
    from a replayed embedding output would apply the multiplier twice. Such a model records
    nothing, and its evals run whole."""
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(vocab_size=len(tiny[1]), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             pad_token_id=tiny[1].pad_token_id, embedding_multiplier=3.0)).eval()
    kw = mfv.eval_kwargs(load_params("tiny", heal_band=[0.5, 1.0], steer_band=[0.5, 1.0]))
    below = _LayerCalls(monkeypatch, HI.decoder_layers(model)[0])
    first = mfv.evaluate(model, tiny[1], progress=False, **kw)
    assert not model.__dict__.get("_shl_bottom_reads")
    below.n = 0
    assert _eval_numbers(mfv.evaluate(model, tiny[1], progress=False, **kw)) == _eval_numbers(first) and below.n > 0


def test_a_replayed_pass_that_reads_other_ids_fails_loudly(tiny):
    model, p, _, _ = _replay_model(tiny)
    kw = mfv.eval_kwargs(p)
    mfv.evaluate(model, tiny[1], progress=False, **kw)
    (rec,) = model.__dict__["_shl_bottom_reads"].values()
    rec.passes[3][0][0, -1] += 1  # the fourth pass's recorded ids no longer those the eval reads
    with pytest.raises(RuntimeError, match="other ids than the recorded one"):
        mfv.evaluate(model, tiny[1], progress=False, **kw)
