"""Heal: train a fresh LoRA per round on kept completions, with a KL barrier toward a reference.

History (earlier rounds' adapters, `shl.history`) is active and frozen while round k's adapter
trains. The barrier's reference is the same model with the adapters switched, never a second
copy of the weights; it is frozen, so its final hidden states at the completion tokens are
computed once before training and each step runs only the LM head on them (`head_terms`, a few
logit rows at a time: no [N, V] float32 tensor is made, and the head's gradient is folded into
[N, H] as the rows go). The decoder layers below the heal band carry no adapter, so what they
make of each completion is the same every epoch: it is read in that same pass (`frozen_states`)
and every step, and every epoch's held-out NLL, starts at the band's first layer
(`shl.models.start_at_layer`).

On the CPU the heal runs transformers' eager attention: torch's CPU flash-attention backward
took 16% of a micro-batch (14 ms a layer at 4 x 141 tokens), and in bfloat16 the eager step sits
as close to the float32 one as the flash step does (benchmarks/results/bench_loop.md).

Loss per micro-batch = NLL (mean over completion tokens)
                     + lam_eff * relu(D - tau)          (D = kl_agg of the per-position KL)
                     + spectral_lam * sum over LoRA pairs of sigma_max(scaling * B A);
the step's loss is the mean over its micro-batches (the spectral term, the same on each, is
computed once per step).

Every micro-batch trains on one backward pass of its total loss. On the steps that measure the
gradient's terms (every `heal_grad_every`-th and the last), a micro-batch whose barrier fires also
takes the barrier term's gradient in an extra backward pass (`torch.autograd.grad`); the NLL
term's is the total's minus it. Their norms summed over the step are what the log reports; other
steps log them as nan (`heal_grad_norms=False`: no step measures). The measuring never touches
the gradient the weights follow, so the trained adapter is the same for any `heal_grad_every`.

Forward and backward run in the model's dtype; the trained LoRA weights and AdamW state are
float32 whatever it is (peft keeps them so), and the adapter is frozen into the model's dtype.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from shl.history import (unwrap, active_adapters, adapters, add_round_adapter, freeze, lora_pairs,
                         set_active)
from shl.models import attention_implementation, decoder_layers, input_device, start_at_layer

AGGREGATES = ("mean", "rmse", "p95", "max")


# --- data ------------------------------------------------------------------------------------

def end_of_turn_id(tok) -> int:
    """The token that closes an assistant turn in the chat template (<|im_end|>, <end_of_turn>,
    <|eot_id|>), so a trained completion learns to stop; the eos token when none is found."""
    cached = getattr(tok, "_shl_eot_id", None)
    if cached is not None:
        return cached
    marker = "SHLENDOFTURNMARKER"
    eot = tok.eos_token_id
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                       tokenize=False)
        ids = tok(text.split(marker, 1)[1], add_special_tokens=False).input_ids
        if ids and (ids[0] in tok.all_special_ids or ids[0] in tok.added_tokens_decoder):
            eot = ids[0]
    except Exception:  # templates without an assistant role or that reject the message
        pass
    tok._shl_eot_id = eot
    return eot


def encode_records(tok, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + end-of-turn id) per record.

    The completion's ids are cut from the tokenized prompt+completion, as the model sees them
    at generation time; if the tokenizer merged across the boundary, the completion is
    tokenized alone instead."""
    eot = end_of_turn_id(tok)
    out = []
    for r in records:
        p_ids = tok(r["chat_prompt"], add_special_tokens=False).input_ids
        full = tok(r["chat_prompt"] + r["completion"], add_special_tokens=False).input_ids
        if full[:len(p_ids)] == p_ids:
            c_ids = full[len(p_ids):]
        else:
            c_ids = tok(r["completion"], add_special_tokens=False).input_ids
        out.append((list(p_ids), list(c_ids) + [eot]))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device=None) -> dict:
    """Right-padded batch: input_ids, attention_mask and loss_mask [B, L]; loss_mask is 1 on
    completion tokens only (never prompt, never padding)."""
    L = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    loss = torch.zeros((len(examples), L), dtype=torch.long)
    for b, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c)
        attn[b, :n] = 1
        loss[b, len(p):n] = 1
    return {k: v.to(device) for k, v in (("input_ids", ids), ("attention_mask", attn), ("loss_mask", loss))}


def split_heldout(records: list, frac: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle; at least one held out when there are >= 2 records."""
    n = len(records)
    n_held = 0 if n < 2 else min(n - 1, max(1, round(frac * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_held])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# --- loss pieces -----------------------------------------------------------------------------

def _predicting(loss_mask) -> torch.Tensor:
    """[B, L] bool: the positions whose next token is a completion token (logits at t-1 predict t)."""
    keep = torch.zeros_like(loss_mask, dtype=torch.bool)
    keep[:, :-1] = loss_mask[:, 1:].bool()
    return keep


def completion_logprobs(model, input_ids, attention_mask, loss_mask, bottom=None) -> torch.Tensor:
    """Log-probs [N, V] (float32) of the next token at the N completion positions, row-major
    over (batch, position).

    Logits at t-1 predict token t, so position t-1 is kept where loss_mask[t] is 1. The
    selection happens before the LM head (transformers' boolean `logits_to_keep`), so neither a
    [B, L, V] logit tensor nor a full-sequence log_softmax is ever made. `bottom` = (layer,
    states [B, L, H]): start the forward at that layer from those states (`frozen_states`)."""
    keep = _predicting(loss_mask)
    with start_at_layer(model, *bottom) if bottom else contextlib.nullcontext():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                       use_cache=False).logits
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"{type(unwrap(model)).__name__} ignored a boolean logits_to_keep "
                           f"(logits {tuple(logits.shape)}); it needs transformers' slice_logits_to_keep")
    return logits.float().log_softmax(-1)


def completion_states(model, input_ids, attention_mask, loss_mask, bottom=None) -> torch.Tensor:
    """Final hidden states [N, H] (the LM head's input) at the N completion positions, in the row
    order of `completion_logprobs`: the decoder alone, so no logit is made (`head_terms` makes them
    a few rows at a time). `bottom` as in `completion_logprobs`."""
    keep = _predicting(loss_mask)
    with start_at_layer(model, *bottom) if bottom else contextlib.nullcontext():
        states = unwrap(model).get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                             use_cache=False).last_hidden_state  # [B, L, H]
    return states[keep]


def completion_targets(input_ids, loss_mask) -> torch.Tensor:
    """The N completion token ids, in the row order of `completion_logprobs`."""
    return input_ids[:, 1:][loss_mask[:, 1:].bool()]


def completion_nll(logp_sel, input_ids, loss_mask) -> torch.Tensor:
    """Mean NLL over completion tokens."""
    targets = completion_targets(input_ids, loss_mask)
    return -logp_sel.gather(-1, targets[:, None]).mean()


def per_position_kl(logp_student, logp_ref, reg: str) -> torch.Tensor:
    """[N] KL per position: kl_rev = KL(student || ref), kl_fwd = KL(ref || student)."""
    if reg == "kl_rev":
        return (logp_student.exp() * (logp_student - logp_ref)).sum(-1)
    if reg == "kl_fwd":
        return (logp_ref.exp() * (logp_ref - logp_student)).sum(-1)
    raise ValueError(f"reg must be kl_rev or kl_fwd for a KL, got {reg!r}")


# rows of the [N, V] logits whose float32 softmax work runs at a time: at SmolLM2's 49k vocabulary 8
# rows (1.5 MB) stay in a CPU core's cache, and the pass over them took a kl_rev micro-batch's
# vocabulary work from 263 ms to 125 ms (benchmarks/results/bench_loop.md); a GPU takes them all at once
CPU_HEAD_ROWS = 8


def _head_logprobs_rows(z, cap):
    """(float32 log-probs of logit rows [R, V] with the soft-cap of models that have one, the cap's
    d capped / d z = 1 - tanh(z / cap)^2, or None without a cap)."""
    z = z.float()
    if not cap:
        return z.log_softmax(-1), None
    th = torch.tanh(z / cap)
    return (th * cap).log_softmax(-1), 1 - th ** 2


class _HeadTerms(torch.autograd.Function):
    """Per-position NLL [N] and KL [N] from final hidden states, the full-vocabulary work done a few
    rows at a time: no [N, V] float32 tensor is made, and each row's d nll / d logits and d kl /
    d logits are folded through the (frozen) LM head into [N, H] in the forward pass already, so the
    backward is two row scalings. Equal to `completion_nll` / `per_position_kl` on `head_logprobs`,
    whose autograd graph holds a dozen [N, V] float32 tensors (tests/test_heal.py)."""

    @staticmethod
    def forward(ctx, h, ref_h, targets, weight, bias, cap, reg, rows, grad=True):
        z = torch.nn.functional.linear(h, weight, bias)  # [N, V], the model's dtype
        zr = None if ref_h is None else torch.nn.functional.linear(ref_h, weight, bias)
        n = z.shape[0]
        nll, kl = z.new_zeros(n, dtype=torch.float32), z.new_zeros(n, dtype=torch.float32)
        # grad False (head_terms under no_grad: the held-out NLL): no gradient to fold
        d_nll = torch.empty_like(z) if grad else None  # d nll_i / d z_i, [N, V]
        d_kl = torch.empty_like(z) if grad and zr is not None else None
        for s in range(0, n, rows):
            c = slice(s, s + rows)
            lp, dcap = _head_logprobs_rows(z[c], cap)
            p = lp.exp()
            t = targets[c, None]
            nll[c] = -lp.gather(1, t)[:, 0]
            if zr is not None:
                lr, _ = _head_logprobs_rows(zr[c], cap)
                if reg == "kl_rev":  # sum p (lp - lr); d/dz = p * (lp - lr - kl)
                    diff = lp.sub_(lr)
                    k = (p * diff).sum(-1)
                    g = diff.sub_(k[:, None]).mul_(p)
                elif reg == "kl_fwd":  # sum pr (lr - lp); d/dz = p - pr
                    pr = lr.exp()
                    k = (pr * (lr - lp)).sum(-1)
                    g = p - pr
                else:
                    raise ValueError(f"reg must be kl_rev or kl_fwd for a KL, got {reg!r}")
                kl[c] = k
                if grad:
                    d_kl[c] = g.mul_(dcap) if cap else g
            if grad:
                g = p.scatter_add_(1, t, p.new_full(t.shape, -1.0))  # p - onehot(target)
                d_nll[c] = g.mul_(dcap) if cap else g
        ga = None if d_nll is None else d_nll @ weight  # [N, H]
        gb = None if d_kl is None else d_kl @ weight
        ctx.save_for_backward(ga, gb)
        return nll, kl

    @staticmethod
    def backward(ctx, g_nll, g_kl):
        ga, gb = ctx.saved_tensors
        dh = g_nll[:, None] * ga.float()
        if gb is not None:
            dh = dh + g_kl[:, None] * gb.float()
        return dh.to(ga.dtype), None, None, None, None, None, None, None, None


def head_terms(model, states, targets, ref_states=None, reg: str = "nll"):
    """(NLL [N], KL [N]) per completion position from the student's final hidden states [N, H],
    the targets [N] and, for a KL, the reference's final states [N, H] (`frozen_states`); the KL is
    zeros without them. The LM head is frozen (no gradient reaches its weight)."""
    head = unwrap(model).get_output_embeddings()
    cap = getattr(unwrap(model).config.get_text_config(), "final_logit_softcapping", None)
    # under a multi-GPU device_map the final norm's GPU, the (tied) head's and the inputs' can differ;
    # F.linear bypasses accelerate's hook that the model's own forward moves them with
    out_device, dev = states.device, head.weight.device
    states, targets = states.to(dev), targets.to(dev)
    ref_states = None if ref_states is None else ref_states.to(dev)
    rows = CPU_HEAD_ROWS if dev.type == "cpu" else max(1, states.shape[0])
    nll, kl = _HeadTerms.apply(states, ref_states, targets, head.weight.detach(),
                               None if head.bias is None else head.bias.detach(), cap, reg, rows,
                               torch.is_grad_enabled() and states.requires_grad)
    return nll.to(out_device), kl.to(out_device)


def aggregate_kl(kl, how: str) -> torch.Tensor:
    """Per-position KL [N] -> D. rmse, p95 and max follow the spikes that mean dilutes."""
    if how == "mean":
        return kl.mean()
    if how == "rmse":
        # = sqrt(mean(kl^2)); the norm's backward is 0 at kl == 0 where sqrt's would be NaN, and
        # kl is exactly 0 on round 0's first step (B = 0: student == reference)
        return torch.linalg.vector_norm(kl) / math.sqrt(kl.numel())
    if how == "p95":
        return torch.quantile(kl, 0.95)
    if how == "max":
        return kl.max()
    raise ValueError(f"kl_agg must be one of {AGGREGATES}, got {how!r}")


def lam_eff(p, round_idx: int) -> float:
    return p.lam * (1 + round_idx) ** p.lam_round_pow


def sigma_max(A, B, iters: int = 3) -> torch.Tensor:
    """Largest singular value of B @ A (A [r, in], B [out, r]) by power iteration, never
    forming the [out, in] product.

    The iteration runs without grad; the estimate ||B A v|| with that unit v is differentiable
    in A and B. It is a lower bound that tightens with iters (how fast depends on the gap
    between the top two singular values)."""
    A32, B32 = A.float(), B.float()
    with torch.no_grad():
        # a fixed start vector keeps the estimate (and so the loss) deterministic
        v = torch.randn(A.shape[1], generator=torch.Generator().manual_seed(0)).to(A32.device)
        v = v / v.norm()
        for _ in range(iters):
            w = A32.T @ (B32.T @ (B32 @ (A32 @ v)))  # (BA)^T (BA) v through [r] and [out] vectors
            v = w / w.norm().clamp_min(torch.finfo(w.dtype).tiny)
    return torch.linalg.vector_norm(B32 @ (A32 @ v))


def spectral_term(model, adapter: str, iters: int) -> torch.Tensor:
    """SUM over the adapter's LoRA pairs of sigma_max(scaling * B A), the weight update each
    layer actually receives (so it grows with the number of adapted matrices, like weight decay)."""
    terms = [s * sigma_max(A, B, iters) for A, B, s in lora_pairs(model, adapter)]
    if not terms:
        raise ValueError(f"adapter '{adapter}' has no LoRA layers")
    return torch.stack(terms).sum()


def reference_names(p, history: list[str]) -> list[str]:
    """Adapters active in the barrier's reference pass: prev = the history (the student before
    this round), base = none. Both are the base model at round 0."""
    return list(history) if p.barrier_ref == "prev" else []


def head_logprobs(model, states: torch.Tensor) -> torch.Tensor:
    """Log-probs [N, V] (float32) from final hidden states [N, H]: the LM head (and the logit
    soft-cap of models that have one), as the model's own forward applies them."""
    logits = unwrap(model).get_output_embeddings()(states).float()
    cap = getattr(unwrap(model).config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1)


def frozen_bottom(model) -> int:
    """The lowest decoder layer that holds a LoRA module (of any adapter): the layers below it
    compute the same thing whatever the adapters, so their output can be read once. 0 (nothing
    to skip) when something below it drops out, since then no two passes agree."""
    layers = decoder_layers(model)
    first = next((i for i, layer in enumerate(layers) if any(isinstance(m, LoraLayer) for m in layer.modules())), 0)
    below = [m for layer in list(layers)[:first] for m in layer.modules()]
    if getattr(unwrap(model).config.get_text_config(), "attention_dropout", 0.0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in below):
        return 0
    return first


def _mismatch(model, what: str, err: float) -> RuntimeError:
    return RuntimeError(f"{type(unwrap(model)).__name__}: {what} gives log-probs {err:.3g} away from the model's own "
                        "forward pass, so it cannot stand in for it in the heal")


@torch.no_grad()
def batch_frozen_states(model, batch: dict, ref_names: list[str] | None, first: int, check: bool = False):
    """One pass of the reference's decoder over the batch (no LM head). Returns (its final hidden
    states [N, H] at the completion positions, in the row order of `completion_logprobs`, or None
    when `ref_names` is None; the input of decoder layer `first` [B, L, H], or None when `first` is
    0). `check`: verify that the LM head on the decoder's final states and a pass started at `first`
    from the layer's input each give the model's own log-probs (a model that post-processes its
    logits some other way, or runs something below `first` per pass, would fail here)."""
    seen = {}
    hooks = []
    if first:
        hooks.append(decoder_layers(model)[first].register_forward_pre_hook(
            lambda m, args: seen.__setitem__("bottom", args[0].detach())))
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    with adapters(model, ref_names or []):
        try:
            h = completion_states(model, ids, attn, mask)  # [N, H]
        finally:
            for handle in hooks:
                handle.remove()
        bottom = seen.get("bottom")
        if check:
            logp = completion_logprobs(model, ids, attn, mask)
            err = (head_logprobs(model, h) - logp).abs().max().item()
            if err > 1e-3:
                raise _mismatch(model, "the LM head on the decoder's final hidden states", err)
            if first:
                err = (completion_logprobs(model, ids, attn, mask, (first, bottom)) - logp).abs().max().item()
                if err > 1e-3:
                    raise _mismatch(model, f"a pass started at decoder layer {first}", err)
    return (h if ref_names is not None else None), bottom


def frozen_states(model, examples, ref_names: list[str] | None, first: int, pad_id: int, batch_size: int):
    """Per training example, computed once before training in one pass of the reference:
    (the reference's final hidden states at its completion positions [n_i, H], or None when
    `ref_names` is None (reg=nll); the input of decoder layer `first` over its tokens [L_i, H],
    or None when `first` is 0).

    The reference is frozen and the data fixed, so every epoch's barrier would recompute the same
    thing: kept here, each step only runs the LM head on them (`head_terms`) instead of a whole
    reference forward pass (~40% of a kl_rev step). Below `first` no adapter acts, so what those
    layers make of each example is the same for the student on every step (`bottom_batch`)."""
    if ref_names is None and not first:  # reg=nll with adapters from layer 0: nothing to read,
        # but the steps read the decoder alone (`completion_states`): check that on one batch
        batch_frozen_states(model, collate(examples[:batch_size], pad_id, input_device(model)), None, 0, check=True)
        return [None] * len(examples), [None] * len(examples)
    ref, bottom = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        h, b = batch_frozen_states(model, collate(chunk, pad_id, input_device(model)), ref_names, first,
                                   check=start == 0)
        ref += list(h.split([len(c) for _, c in chunk])) if h is not None else [None] * len(chunk)
        bottom += [b[i, :len(p) + len(c)] for i, (p, c) in enumerate(chunk)] if b is not None else [None] * len(chunk)
    return ref, bottom


def bottom_batch(states: list[torch.Tensor]) -> torch.Tensor:
    """Per-example layer inputs [L_i, H] -> [B, L, H], right-padded with zeros as `collate` pads
    the ids (causal attention never lets a real position see a padded one)."""
    L = max(s.shape[0] for s in states)
    out = states[0].new_zeros((len(states), L, states[0].shape[-1]))
    for b, s in enumerate(states):
        out[b, :s.shape[0]] = s
    return out


def heal_loss(model, batch: dict, p, round_idx: int, adapter: str, ref_states: torch.Tensor | None = None,
              with_spectral: bool = True, bottom=None) -> dict:
    """The loss terms on one batch, with the student's adapters as currently active.

    Returns total, nll, barrier (lam_eff * relu(D - tau)), spectral (spectral_lam * sigma sum),
    D (aggregated KL; 0 for reg == nll) and kl (per position, detached). `ref_states` are the
    reference's final hidden states at the batch's completion positions [N, H]
    (`frozen_states`); reg == nll needs none. `with_spectral=False` leaves the spectral term out
    (0): it depends on the adapter's weights only, so `heal` computes it once per optimizer step.
    `bottom` = (layer, states [B, L, H]): the forward starts there (`frozen_states`)."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    if p.reg != "nll" and ref_states is None:
        raise ValueError(f"reg={p.reg} needs the reference states of the batch")
    nll_rows, kl = head_terms(model, completion_states(model, ids, attn, mask, bottom),
                              completion_targets(ids, mask), ref_states if p.reg != "nll" else None, p.reg)
    nll = nll_rows.mean()
    zero = nll.new_zeros(())
    if p.reg == "nll":
        D, barrier = zero, zero
    else:
        D = aggregate_kl(kl, p.kl_agg)
        barrier = lam_eff(p, round_idx) * torch.relu(D - p.tau)
    kl = kl.detach()
    spectral = (p.spectral_lam * spectral_term(model, adapter, p.spectral_iters)
                if p.spectral_lam > 0 and with_spectral else zero)
    return {"total": nll + barrier + spectral, "nll": nll, "barrier": barrier, "spectral": spectral, "D": D, "kl": kl}


# --- training --------------------------------------------------------------------------------

def _grads(term, params, k: int):
    """d(term / k)/d params, zeros where the term does not reach (or carries no graph)."""
    if not term.requires_grad:
        return [torch.zeros_like(q) for q in params]
    return list(torch.autograd.grad(term / k, params, retain_graph=True, allow_unused=True, materialize_grads=True))


def _norm(grads) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def measures_grads(p, step: int, total_steps: int) -> bool:
    """Whether optimizer step `step` measures the gradient's terms (an extra backward pass per
    micro-batch while the barrier fires): every `heal_grad_every`-th step and the last one."""
    return p.heal_grad_norms and (step % p.heal_grad_every == 0 or step == total_steps - 1)


@torch.no_grad()
def heldout_nll(model, examples, pad_id: int, batch_size: int, first: int = 0, bottom=None) -> float:
    """Token-weighted mean NLL over completion tokens (nan when there is nothing held out).
    `first`, `bottom`: start every pass at that layer from each example's input to it
    (`frozen_states`), as the training steps do."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, attn, mask = (collate(examples[start:start + batch_size], pad_id, input_device(model))[k]
                           for k in ("input_ids", "attention_mask", "loss_mask"))
        targets = completion_targets(ids, mask)
        started = (first, bottom_batch(bottom[start:start + batch_size])) if first else None
        total += head_terms(model, completion_states(model, ids, attn, mask, started), targets)[0].sum().item()
        count += targets.numel()
    return total / count if count else math.nan


def train_attention(model) -> str | None:
    """The attention the heal trains with: eager on the CPU (see the module docstring), the loaded
    one elsewhere."""
    return "eager" if input_device(model).type == "cpu" else None


def _non_finite(step: int, nll: float, D: float):
    return RuntimeError(f"non-finite loss at step {step}: nll={nll}, D={D}; lower lr or check the data")


def heal(model, tok, records: list[dict], p, round_idx: int, history: list[str], progress: bool = True,
         name: str = ""):
    """Train adapter `name` (default r{round_idx}) on `records` (each with `chat_prompt` and
    `completion`) with the `history` adapters active and frozen. Returns (peft model, log).
    The seed, the schedule and lam_eff follow `round_idx` whatever the name (the null control arm
    trains adapter `null` exactly as round 0 trains r0).

    A plain model is wrapped in place. Afterwards history + the new adapter are active and all
    frozen, model in eval mode. On a non-finite loss or gradient a RuntimeError is raised; on any
    error (an interrupt too) the new adapter is removed again, so the model is as it came and the
    round can simply be re-run (nothing is saved here in any case).

    log: steps (one dict per optimizer step; D and nll are means over its micro-batches,
    barrier_fired = some micro-batch had D > tau, grad_* are the norms of the step's summed
    gradients of each term before clipping, nan on steps that do not measure them),
    epochs (train and held-out NLL), final_D (mean D over the last epoch's steps), seconds,
    barrier_fired_any."""
    t0 = time.time()
    if not records:
        raise ValueError("heal needs at least one record")
    history = list(history)
    missing = [h for h in history if not isinstance(model, PeftModel) or h not in model.peft_config]
    if missing:
        raise ValueError(f"history adapters {missing} are not loaded on the model (load_adapters first)")
    seed = p.seed + round_idx  # a fresh draw each round, the same one when a round is redone
    torch.manual_seed(seed)  # the new LoRA's A is drawn from torch's RNG
    name = name or f"r{round_idx}"
    wrapped_here = not isinstance(model, PeftModel)
    prev_active = active_adapters(model)
    model = add_round_adapter(model, p, round_idx, name)
    set_active(model, history + [name])
    # the new adapter's weights only: any other parameter a caller left trainable stays out
    params = [w for A, B, _ in lora_pairs(model, name) for w in (A, B)]

    train_recs, held_recs = split_heldout(records, p.heldout_frac, seed)
    train_ex, held_ex = encode_records(tok, train_recs), encode_records(tok, held_recs)
    pad_id = tok.pad_token_id
    dev = input_device(model)
    n_micro = math.ceil(len(train_ex) / p.train_batch_size)
    steps_per_epoch = math.ceil(n_micro / p.grad_accum)
    total_steps = p.epochs * steps_per_epoch
    opt = torch.optim.AdamW(params, lr=p.lr, betas=(0.9, 0.95), weight_decay=p.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, round(p.warmup_frac * total_steps), total_steps)
    order_gen = torch.Generator().manual_seed(seed)

    steps, epochs = [], []
    bar = tqdm(total=total_steps, desc=f"heal {name}", disable=not progress, leave=False)
    try:
        with attention_implementation(model, train_attention(model)):
            first = frozen_bottom(model)
            # the held-out examples ride in the same pass: their layer inputs start every epoch's held-out NLL
            ref, bottom = frozen_states(model, train_ex + held_ex, reference_names(p, history) if p.reg != "nll" else None,
                                        first, pad_id, p.train_batch_size)
            ref, bottom, held_bottom = ref[:len(train_ex)], bottom[:len(train_ex)], bottom[len(train_ex):]
            model.train()
            step = 0
            for epoch in range(p.epochs):
                order = torch.randperm(len(train_ex), generator=order_gen).tolist()
                micro = [order[i:i + p.train_batch_size] for i in range(0, len(order), p.train_batch_size)]
                for s in range(steps_per_epoch):
                    group = micro[s * p.grad_accum:(s + 1) * p.grad_accum]
                    k = len(group)
                    measure = measures_grads(p, step, total_steps)
                    g_tot, g_bar, g_spec = ([torch.zeros_like(q) for q in params] for _ in range(3))
                    nlls, Ds, fired = [], [], False
                    for idx in group:
                        batch = collate([train_ex[i] for i in idx], pad_id, dev)
                        t = heal_loss(model, batch, p, round_idx, name,
                                      torch.cat([ref[i] for i in idx]) if p.reg != "nll" else None, with_spectral=False,
                                      bottom=(first, bottom_batch([bottom[i] for i in idx])) if first else None)
                        nll, D = t["nll"].item(), t["D"].item()
                        if not (math.isfinite(nll) and math.isfinite(D) and torch.isfinite(t["total"])):
                            raise _non_finite(step, nll, D)
                        # measuring steps take the barrier's gradient in an extra backward pass (relu(D - tau)
                        # == 0 has exactly zero gradient: no pass then); the weights always follow the one
                        # backward pass of the total, so the adapter is the same whichever steps measure
                        if measure and t["barrier"].item() > 0:
                            for a, g in zip(g_bar, _grads(t["barrier"], params, k)):
                                a += g
                        for a, g in zip(g_tot, _grads(t["total"], params, k)):
                            a += g
                        nlls.append(nll)
                        Ds.append(D)
                        fired |= p.reg != "nll" and D > p.tau
                    # the weights do not change within a step, so the spectral term (20 power iterations
                    # over every LoRA pair) is the same on each micro-batch: the mean of k equal terms is
                    # one of them, computed once (it was k times, the same loss and gradient)
                    spec = 0.0
                    if p.spectral_lam > 0:
                        spectral = p.spectral_lam * spectral_term(model, name, p.spectral_iters)
                        if not torch.isfinite(spectral):
                            raise _non_finite(step, sum(nlls) / k, sum(Ds) / k)
                        for a, g in zip(g_spec, torch.autograd.grad(spectral, params, allow_unused=True,
                                                                     materialize_grads=True)):
                            a += g
                        spec = spectral.item()
                    for q, a, c in zip(params, g_tot, g_spec):
                        q.grad = a + c
                    # the NLL's share of the total by linearity: the barrier is the smaller term, measured
                    # directly, so the difference loses no precision that matters to either norm
                    grad_nll, grad_bar = ((_norm([a - b for a, b in zip(g_tot, g_bar)]), _norm(g_bar)) if measure
                                          else (math.nan, math.nan))
                    lr = opt.param_groups[0]["lr"]
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm).item()
                    if not math.isfinite(grad_norm):
                        # a finite loss can still overflow its gradient; stepping would leave NaN weights
                        raise RuntimeError(f"non-finite gradient at step {step}: |grad|={grad_norm}, nll={sum(nlls) / k}; "
                                           "lower lr or check the data")
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    steps.append({
                        "step": step, "epoch": epoch, "nll": sum(nlls) / k, "D": sum(Ds) / k,
                        "barrier_fired": bool(fired), "grad_nll": grad_nll, "grad_barrier": grad_bar,
                        "pressure": grad_bar / grad_nll if grad_nll > 0 else (0.0 if measure else math.nan), "lr": lr,
                        "grad_norm": grad_norm, "spectral": spec,
                    })
                    bar.update(1)
                    bar.set_postfix(nll=f"{steps[-1]['nll']:.3f}", D=f"{steps[-1]['D']:.3f}")
                    step += 1
                held = heldout_nll(model, held_ex, pad_id, p.train_batch_size, first, held_bottom)
                if held_ex and not math.isfinite(held):
                    raise RuntimeError(f"non-finite held-out NLL after epoch {epoch}: {held}; lower lr or check the data")
                ep_steps = [x for x in steps if x["epoch"] == epoch]
                epochs.append({"epoch": epoch, "heldout_nll": held,
                               "train_nll": sum(x["nll"] for x in ep_steps) / len(ep_steps)})
    except BaseException:
        # leave the model as it came: no half-trained adapter behind a raised error
        bar.close()
        model.eval()
        if wrapped_here:
            model.unload()  # puts the original projections back into the caller's model object
        else:
            model.delete_adapter(name)
            set_active(model, prev_active)
        raise
    bar.close()
    freeze(model, [name])
    model.eval()

    fired_any = any(x["barrier_fired"] for x in steps)
    last = [x["D"] for x in steps if x["epoch"] == p.epochs - 1]
    if p.reg != "nll" and not fired_any:
        warnings.warn(f"the barrier never fired: tau={p.tau} sits above the operating KL "
                      f"(largest step D={max(x['D'] for x in steps):.4g}), so this run equals reg=nll; lower tau",
                      stacklevel=2)
    log = {"steps": steps, "epochs": epochs, "final_D": sum(last) / len(last), "seconds": time.time() - t0,
           "barrier_fired_any": fired_any}
    return model, log


def summary_line(log: dict, p, round_idx: int) -> dict:
    """The `heal` metrics line of one round: last epoch's train and held-out NLL, final D, seconds."""
    last = log["epochs"][-1]
    return {"stage": "heal", "round": round_idx, "reg": p.reg, "train_nll": last["train_nll"],
            "heldout_nll": last["heldout_nll"], "final_D": log["final_D"], "seconds": log["seconds"],
            "steps": len(log["steps"]), "barrier_fired_any": log["barrier_fired_any"]}
