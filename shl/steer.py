"""Steering vectors: extract (mean difference, PCA or LDA of paired hidden states), apply (a forward hook), compare.

A vector is plain data: {layer index: direction [hidden]} plus metadata. Applying it adds
`coeff * v_l` to the output hidden state of decoder layer l at every position, prompt and
generated, and the hooks are gone when the context exits, exception or not.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from transformers import DynamicCache

from shl.generate import batches
from shl.history import reads_merged
from shl.models import (band_layers, chat_prompt, decoder_layers, input_device, left_pad, num_layers, positions,
                        shared_prefix_len)


@dataclass
class Vector:
    layers: dict[int, torch.Tensor]  # layer index -> direction [hidden], float32 on CPU
    meta: dict = field(default_factory=dict)

    def save(self, path: Path):
        torch.save({"layers": self.layers, "meta": self.meta}, path)

    @classmethod
    def load(cls, path: Path) -> "Vector":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls({int(k): v for k, v in data["layers"].items()}, data["meta"])

    def norms(self) -> dict[int, float]:
        return {l: v.norm().item() for l, v in self.layers.items()}


def _hidden(output) -> torch.Tensor:
    # a decoder layer returns a tensor or a tuple whose first item is the hidden state
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(model, layers: list[int]):
    """Record each listed layer's output hidden state [B, L, H] of the next forward passes."""
    mods = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [mods[l].register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, _hidden(out).detach()))
               for l in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def steer(model, vector: Vector | None, coeff: float = 1.0):
    """Add coeff * v_l to decoder layer l's output at every position while the context is open."""
    if vector is None or coeff == 0:
        yield
        return
    mods = decoder_layers(model)
    handles = []
    for l, v in vector.layers.items():
        ref = next(mods[l].parameters())
        delta = (coeff * v).to(device=ref.device, dtype=ref.dtype)

        def hook(module, args, output, delta=delta):
            if isinstance(output, tuple):
                return (output[0] + delta,) + tuple(output[1:])
            return output + delta

        handles.append(mods[l].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Done(Exception):
    """Raised by a hook after the deepest layer a read needs: the rest of the forward is waste."""


@torch.no_grad()
@reads_merged
def last_token_states(model, tok, prompts: list[str], layers: list[int], batch_size: int = 16,
                      progress: bool = True, desc: str = "hidden states") -> dict[int, torch.Tensor]:
    """Each layer's output at the last prompt token: {layer: [N, hidden]} float32 on CPU.

    Two savings that leave the numbers as a plain forward pass gives them (within float rounding):
    - the token prefix all prompts share (the chat template and system prompt: the persona or the
      default system text, about half of each prompt) runs once, and every batch continues from
      a copy of its KV cache with only its own suffix (left-padded after the prefix, the padding
      masked, positions counted as if unpadded);
    - the forward pass stops after the deepest layer in `layers`."""
    dev = input_device(model)
    mods = decoder_layers(model)
    deepest = max(layers)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    P = shared_prefix_len(ids, cap=min(map(len, ids)) - 1)  # every row keeps its last token in the suffix
    seen: dict[int, torch.Tensor] = {}

    def stop(module, args, output):
        raise _Done

    def hook(module, args, output, l):
        seen[l] = _hidden(output)[:, -1].float().cpu()
        if l == deepest:
            raise _Done

    def run(**inputs):
        try:
            model(**inputs)
        except _Done:
            pass

    handles = []
    out = {l: [] for l in layers}
    try:
        prefix_cache = None
        if P:
            prefix_cache = DynamicCache(config=model.config)
            handles = [mods[deepest].register_forward_hook(stop)]
            run(input_ids=torch.tensor([ids[0][:P]], device=dev), past_key_values=prefix_cache, use_cache=True)
            handles.pop().remove()
        handles = [mods[l].register_forward_hook(lambda m, a, o, l=l: hook(m, a, o, l)) for l in layers]
        for start in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not progress, leave=False):
            suf = [x[P:] for x in ids[start:start + batch_size]]
            B = len(suf)
            inp, smask = left_pad(suf, tok.pad_token_id)  # [B, S]
            attn = torch.cat([torch.ones((B, P), dtype=torch.long), smask], dim=1)  # [B, P + S]
            cache = None
            if P:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(B)
            seen.clear()
            run(input_ids=inp.to(dev), attention_mask=attn.to(dev), position_ids=(P + positions(smask)).to(dev),
                past_key_values=cache, use_cache=bool(P), logits_to_keep=1)
            for l in layers:
                out[l].append(seen[l])
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(v) for l, v in out.items()}


# --- extraction methods: (h_pos [N, H], h_neg [N, H]) -> direction [H], one layer at a time ---------

def mean_diff_direction(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """mean_i (h_pos_i - h_neg_i): the mean of the paired differences (contrastive activation
    addition, Rimsky et al. 2024, arXiv:2312.06681; the `steering-vectors` library's default).
    Its norm is kept: it is the scale every other method is brought to (see `extract`)."""
    return (h_pos - h_neg).mean(0)


def _majority_sign(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Flip u so that most paired differences project positively on it (ties: the sign of the
    largest projection). A principal or discriminant axis has no sign of its own; this ties it to
    pos - neg without using the mean, which may be ~0."""
    proj = d @ u  # [N]
    votes = int((proj > 0).sum()) - int((proj < 0).sum())
    sign = votes if votes else proj[proj.abs().argmax()].item()
    return -u if sign < 0 else u


def pca_direction(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """Top principal component of the paired differences d_i = h_pos_i - h_neg_i after
    subtracting their mean, sign by the majority of the d_i's projections, unit norm.

    Where the persona's effect varies from context to context (large where the context touches the
    trait, small elsewhere), that variation is the axis, and the constant offset every pos prompt
    adds (style, length of the system prompt) is what the centring removes. repeng (vgel, 2024)
    and RepE (Zou et al. 2023, arXiv:2310.01405) take PCA of paired differences; steering-lite's
    `pca` (centred) ranked first by selectivity on Qwen3-4B."""
    d = (h_pos - h_neg).double()
    if d.shape[0] < 2:
        raise ValueError("pca needs at least 2 contexts (one difference has no variance); raise n_contexts")
    _, _, vh = torch.linalg.svd(d - d.mean(0), full_matrices=False)
    return _majority_sign(vh[0], d).float()


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Shrunk covariance (b2/d2) m I + (1 - b2/d2) S of centred rows x [n, p] (Ledoit & Wolf 2004,
    J. Multivariate Analysis 88(2), 365-411): well-conditioned when n < p, no tuning knob."""
    n, p = x.shape
    s = x.T @ x / n
    m = torch.trace(s) / p
    d2 = ((s - m * torch.eye(p, dtype=x.dtype)) ** 2).sum() / p
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k (|x_k|^4 - 2 x_k^T S x_k) + n |S|_F^2
    sq = (x * x).sum(1)
    b2_bar = ((sq ** 2).sum() - 2 * ((x @ s) * x).sum() + n * (s ** 2).sum()) / (n ** 2 * p)
    b2 = torch.minimum(b2_bar, d2)
    return (b2 / d2) * m * torch.eye(p, dtype=x.dtype) + (1 - b2 / d2) * s


def lda_direction(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """Fisher's discriminant S_w^{-1} (mu_pos - mu_neg), S_w the within-class covariance of the
    pos and neg states (each centred on its own mean) with Ledoit-Wolf shrinkage; sign by the
    majority of the paired differences' projections, unit norm.

    It discounts the directions the states vary along from context to context (what the user
    message is about), so a mean difference that leaks into topic directions is cleaned out of
    them. The literature predicts it steers worse than the mean difference (Marks & Tegmark 2023,
    arXiv:2310.06824: mass-mean directions were more causally implicated than logistic-regression
    probe directions; Li et al. 2023, ITI, arXiv:2306.03341: the mass-mean shift beat probe weight
    directions); 01 measures it on this model."""
    hp, hn = h_pos.double(), h_neg.double()
    if hp.shape[0] < 2:
        raise ValueError("lda needs at least 2 contexts for a covariance; raise n_contexts")
    within = torch.cat([hp - hp.mean(0), hn - hn.mean(0)])
    w = torch.linalg.solve(ledoit_wolf(within), hp.mean(0) - hn.mean(0))
    return _majority_sign(w / w.norm(), hp - hn).float()


# Cosine-gated steering (add coeff * gate(cos(h, v)) * v only where the state already leans on
# the axis) is left out: its gate reads the hidden state at inference, so no fixed vector stands
# for it. It could still drive generation, and the loop distils completions, not vectors, so the
# adapter would learn whatever the gated steering wrote; but the student-vector diagnostic and
# the iso-KL dose would compare against an ungated v, and the gate's threshold is one more knob.
METHODS = {"mean_diff": mean_diff_direction, "pca": pca_direction, "lda": lda_direction}


def direction(method: str, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """One layer's steering vector by `method`, sized to the mean difference's norm: the raw
    coefficients (steer_coeff, sweep_coeffs) then mean a push of the same size for every method,
    and at a matched dose (`calibrate`) the norm does not matter at all."""
    if method not in METHODS:
        raise ValueError(f"unknown steer_method {method!r}: use one of {sorted(METHODS)}")
    u = METHODS[method](h_pos, h_neg)
    return u * ((h_pos - h_neg).mean(0).norm() / u.norm())


def extract(model, tok, pos: str, neg: str, contexts: list[str], layers: list[int], batch_size: int = 16,
            progress: bool = True, method: str = "mean_diff") -> Vector:
    """Per layer, `direction(method, h_l(pos + x), h_l(neg + x))` over the contexts x, read at the
    assistant tag (mean_diff: v_l = mean over contexts of h_l(pos + x) - h_l(neg + x))."""
    if not contexts:
        raise ValueError("no extraction contexts")
    if method not in METHODS:  # before the forward passes
        raise ValueError(f"unknown steer_method {method!r}: use one of {sorted(METHODS)}")
    h_pos = last_token_states(model, tok, [chat_prompt(tok, x, pos) for x in contexts], layers, batch_size, progress, "extract pos")
    h_neg = last_token_states(model, tok, [chat_prompt(tok, x, neg) for x in contexts], layers, batch_size, progress, "extract neg")
    return Vector({l: direction(method, h_pos[l], h_neg[l]) for l in layers},
                  {"method": method, "pos": pos, "neg": neg, "n_contexts": len(contexts), "layers": layers})


def student_vector(h_student: dict[int, torch.Tensor], h_reference: dict[int, torch.Tensor]) -> Vector:
    """mean(h_student(x) - h_reference(x)): the hidden states of the same neutral prompts
    (`last_token_states`) read with the student's adapters and with the reference's. Its cosine
    with the teacher vector says whether the trait moved into the weights."""
    return Vector({l: (h_student[l] - h_reference[l]).mean(0) for l in h_student}, {"method": "student"})


def cosine(a: Vector, b: Vector) -> tuple[dict[int, float], float]:
    """Per-layer cosine over the shared layers, and the cosine of the concatenated vectors."""
    shared = sorted(set(a.layers) & set(b.layers))
    if not shared:
        raise ValueError("the two vectors share no layer")
    per = {l: torch.nn.functional.cosine_similarity(a.layers[l], b.layers[l], dim=0).item() for l in shared}
    flat = torch.nn.functional.cosine_similarity(torch.cat([a.layers[l] for l in shared]),
                                                 torch.cat([b.layers[l] for l in shared]), dim=0).item()
    return per, flat


@torch.no_grad()
def unsteered_logprobs(model, tok, prompts: list[str], batch_size: int = 8) -> list[tuple[dict, torch.Tensor]]:
    """Per batch: the left-padded encoding and the unsteered next-token log-probs at its real
    positions [n_real, V] (selected before log_softmax, never [B, L, V] in log space)."""
    dev = input_device(model)
    old_side, tok.padding_side = tok.padding_side, "left"
    try:
        out = []
        for chunk in batches(prompts, batch_size):
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            enc["position_ids"] = positions(enc.attention_mask)
            out.append((enc, model(**enc).logits[enc.attention_mask.bool()].float().log_softmax(-1)))
    finally:
        tok.padding_side = old_side
    return out


@torch.no_grad()
def kl_p95(model, tok, vector: Vector, coeff: float, prompts: list[str], batch_size: int = 8,
           base: list | None = None) -> float:
    """p95 over real prompt tokens of KL(steered || unsteered) of the next-token distribution.
    `base` (from `unsteered_logprobs`) saves the unsteered pass when called repeatedly."""
    kls = []
    for enc, base_lp in base or unsteered_logprobs(model, tok, prompts, batch_size):
        with steer(model, vector, coeff):
            steered = model(**enc).logits[enc.attention_mask.bool()].float().log_softmax(-1)
        kls.append((steered.exp() * (steered - base_lp)).sum(-1).cpu())
    return torch.quantile(torch.cat(kls), 0.95).item()


def calibrate(model, tok, vector: Vector, prompts: list[str], target: float, iters: int = 12,
              hi: float = 1.0, batch_size: int = 8) -> tuple[float, list[tuple[float, float]]]:
    """Bisect the coefficient until the p95 per-token KL(steered||unsteered) hits `target` nats.
    Returns (coeff, [(coeff, p95), ...] trace)."""
    trace = []
    base = unsteered_logprobs(model, tok, prompts, batch_size)  # the same for every coefficient
    while True:  # grow the bracket until it holds the target
        k = kl_p95(model, tok, vector, hi, prompts, batch_size, base)
        trace.append((hi, k))
        if k >= target or hi > 1e4:
            break
        hi *= 2
    if trace[-1][1] < target:
        raise RuntimeError(f"even coeff {hi:g} gives p95 KL {trace[-1][1]:.3g} < target {target}: the vector is ~zero")
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        k = kl_p95(model, tok, vector, mid, prompts, batch_size, base)
        trace.append((mid, k))
        lo, hi = (mid, hi) if k < target else (lo, mid)
    return (lo + hi) / 2, trace
