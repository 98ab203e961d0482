"""The adapter history: one peft model holds every round's LoRA adapter.

"Baked" state = the adapters of all earlier rounds active together, frozen; base = none active.
Round k adds a fresh adapter `r{k}` on top (the only trainable one), saves it as a standard peft
folder (`PeftModel.from_pretrained` loads it), and a resumed run loads the saved ones back as
frozen history. `adapters(model, names)` switches the active stack for a block of code (the
barrier's reference pass, the base eval, the student vector) without a second copy of the weights.
`merged(model)` is the fast read of a frozen stack: its LoRA updates summed into the weights for a
block of forward passes (evals, generation, hidden-state reads), the original weights put back after.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from shl.models import band_layers, decoder_layers, num_layers

@contextlib.contextmanager
def _quiet_peft():
    # peft 0.21 probes transformers' deprecated `is_gradient_checkpointing` on every wrap/load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def unwrap(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


# --- config and adapters ---------------------------------------------------------------------

def lora_config(model, p) -> LoraConfig:
    """Rank r, alpha 2r, no dropout, on `lora_modules` of the decoder layers in `heal_band` only.

    The target is a regex over full module names anchored at the text decoder's layer list, not
    `layers_to_transform`: that one matches any `layers.<i>` (a vision tower's too, on gemma-3)."""
    root = unwrap(model)
    layers = decoder_layers(root)
    prefix = next(name for name, m in root.named_modules() if m is layers)
    idx = band_layers(num_layers(root), p.heal_band)
    target = (rf"{re.escape(prefix)}\.({'|'.join(map(str, idx))})\.(?:.+\.)?"
              rf"({'|'.join(map(re.escape, p.lora_modules))})")
    return LoraConfig(r=p.lora_r, lora_alpha=2 * p.lora_r, lora_dropout=0.0, target_modules=target,
                      bias="none", task_type="CAUSAL_LM")


def _grad_flags(model) -> dict:
    return {q: q.requires_grad for q in model.parameters()}


def _restore_grad_flags(model, flags: dict):
    for q in model.parameters():
        if q in flags:
            q.requires_grad_(flags[q])


def active_adapters(model) -> list[str]:
    return list(model.active_adapters) if isinstance(model, PeftModel) else []


def set_active(model, names: list[str]):
    """Activate exactly `names` together (the baked history stack); [] = base model.

    Which parameters are trainable does not change: peft's set_adapter turns requires_grad on
    for every adapter it activates, so the flags are put back afterwards."""
    names = list(names)
    _refuse_inside_merged(model, "set_active")
    if not isinstance(model, PeftModel):
        if names:
            raise ValueError(f"cannot activate adapters {names}: the model has no peft adapters yet")
        return
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the model has {list(model.peft_config)}")
    flags = _grad_flags(model)
    model.base_model.set_adapter(names)  # LoraModel takes a list; PeftModel.set_adapter only one name
    _restore_grad_flags(model, flags)
    if names:
        # PeftModel keeps one name of its own for config look-ups (disable_adapter, forward)
        model.active_adapter = names[-1]


@contextlib.contextmanager
def adapters(model, names: list[str]):
    """Temporarily activate `names` ([] = adapters disabled: the base model); restores the
    previous active list and requires_grad flags on exit, exception or not."""
    names = list(names)
    _refuse_inside_merged(model, "adapters")
    if not isinstance(model, PeftModel):
        set_active(model, names)  # raises unless names == []
        yield model
        return
    prev, flags = active_adapters(model), _grad_flags(model)
    try:
        if names:
            set_active(model, names)
            yield model
        else:
            with model.disable_adapter():
                yield model
    finally:
        # leaving disable_adapter re-enables the layers through set_adapter, which sets
        # requires_grad on every active adapter: history would silently become trainable
        set_active(model, prev)
        _restore_grad_flags(model, flags)


# --- the merged read: a frozen stack summed into the weights ---------------------------------

# False reads through peft's unmerged layers everywhere (the slow path, kept for the equality test:
# tests/test_speed.py)
MERGE_READS = True
# Only weights this precise take a LoRA update without losing it. In bfloat16 the sum W + B A
# rounds the update to W's own precision (8 bits): on the embedded model a merged read of round 0's
# healed adapter moved authority by 0.08 nats against the live read (healed trait +0.08 instead of
# +0.16), and round 1 then sampled other data. The live bfloat16 path keeps A and B to their own
# precision, so a bfloat16 model reads its adapters through peft's layers.
EXACT_DTYPES = (torch.float32, torch.float64)


def _refuse_inside_merged(model, what: str):
    # counted on every merged() entry, merging or not, so a switch fails the same way in a
    # bfloat16 run (which reads live) as in a float32 one (which merges)
    if getattr(model, "_shl_reads", 0):
        raise RuntimeError(f"{what}() inside merged(): the active adapters may be summed into the weights for "
                           "this block; switch adapters outside it")


def _mergeable(model) -> list:
    """The LoRA layers whose active adapters `merged` may sum into the weights; [] when the read
    must go through peft's layers (no adapters, adapters disabled, one still training, a variant)."""
    if not (MERGE_READS and isinstance(model, PeftModel)) or getattr(model, "_shl_merged", False):
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        act = [n for n in m.active_adapters if n in m.lora_A]
        if (m.get_base_layer().weight.dtype not in EXACT_DTYPES or m.disable_adapters or m.merged
                or any(n in m.lora_variant or m.lora_bias.get(n) for n in act)  # get_delta_weight has no bias
                or any(m.lora_A[n].weight.requires_grad or m.lora_B[n].weight.requires_grad for n in act)):
            return []
    return [m for m in layers if any(n in m.lora_A for n in m.active_adapters)]


@contextlib.contextmanager
def merged(model):
    """Forward passes in this block see each active (frozen) adapter's B A * scaling added to its
    base weight, and the LoRA layers bypassed: the same function as the stack (in float32 within
    1e-4 on every eval key, tests/test_speed.py), without the adapter matmuls.

    peft's own merge_adapter adds in place and unmerge subtracts again, which in bfloat16 leaves
    W + BA - BA != W: the base weights would drift a little every round. Here the sum is a new
    tensor (in float32, then the base dtype) and the original weight object is put back on exit,
    bit for bit. Costs one extra copy of the adapted weights while open. Nothing happens (a plain
    read through peft) for a plain model, no active adapters, adapters disabled, an adapter still
    training, or base weights in bfloat16/float16 (EXACT_DTYPES); nested use is a plain read of
    the outer merge."""
    if not isinstance(model, torch.nn.Module):  # a scorer-only eval passes no model
        yield model
        return
    layers = _mergeable(model)
    model._shl_reads = getattr(model, "_shl_reads", 0) + 1
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                base = m.get_base_layer()
                W = base.weight
                delta = sum(m.get_delta_weight(n).float() for n in m.active_adapters if n in m.lora_A)
                saved.append((m, base, W))
                base.weight = torch.nn.Parameter((W.float() + delta).to(W.dtype), requires_grad=False)
                m._disable_adapters = True  # peft's forward then runs the base layer alone
        if layers:  # a nested or live read leaves the outer state alone
            model._shl_merged = True
        yield model
    finally:
        for m, base, W in reversed(saved):
            base.weight = W
            m._disable_adapters = False
        if layers:
            model._shl_merged = False
        model._shl_reads -= 1


def reads_merged(fn):
    """Run `fn(model, ...)` (a read: eval, generation, hidden states) inside `merged(model)`."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with merged(model):
            return fn(model, *args, **kwargs)
    return wrapper


def freeze(model, names: list[str]):
    """Make adapters `names` frozen history: no gradient, and weights in the base layers' dtype.

    peft keeps LoRA weights in float32 on a bfloat16 model (right for training); a frozen one
    would make every adapted layer cast its input to float32 and its output back, which doubled
    the eval's time on a bfloat16 CPU model. A float32 model is untouched."""
    if not names:
        return
    model.set_requires_grad(list(names), requires_grad=False)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            dtype = m.get_base_layer().weight.dtype
            for name in names:
                if name in m.lora_A and m.lora_A[name].weight.dtype != dtype:
                    m.lora_A[name].to(dtype)
                    m.lora_B[name].to(dtype)


def add_round_adapter(model, p, round_idx: int, name: str = "") -> PeftModel:
    """Add adapter `name` (default `r{round_idx}`; fresh LoRA, B = 0) and make it the only trainable one.

    It becomes active on top of whatever was active (the history). A plain model is wrapped in
    place: its projections are replaced by LoRA layers, so keep a copy if the plain one is needed."""
    name = name or f"r{round_idx}"
    cfg = lora_config(model, p)
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter '{name}' already exists: round {round_idx} was healed already")
        prev = active_adapters(model)
        with _quiet_peft():
            model.add_adapter(name, cfg)
    else:
        prev = []
        with _quiet_peft():
            model = get_peft_model(model, cfg, adapter_name=name)
    freeze(model, [n for n in model.peft_config if n != name])
    model.set_requires_grad(name, requires_grad=True)
    set_active(model, prev + [name])
    return model


def save_adapter(model, name: str, path) -> Path:
    """Write adapter `name` as a standard peft folder at `path` (PeftModel.from_pretrained loads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # peft saves a non-"default" adapter into <dir>/<name>/: save into a temp dir, then move that
    # subfolder into place, so an interrupted save never leaves a half-written adapter at `path`
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[name])
        src = tmp / name if name != "default" else tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(src, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_adapters(model, paths_by_name: dict) -> PeftModel:
    """Load saved adapters as frozen history, active together on top of any already active."""
    names = list(paths_by_name)
    prev = active_adapters(model)
    with _quiet_peft():
        for name, path in paths_by_name.items():
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
    set_active(model, prev + names)
    freeze(model, names)
    return model


def lora_pairs(model, adapter: str):
    """(A [r, in], B [out, r], scaling) for every LoRA layer of `adapter`."""
    for m in model.modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            yield m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.scaling[adapter]


def drop_adapter(model, name: str):
    """Take adapter `name` off the model (a control arm's, once evaluated); the model is returned
    plain when it was the only one."""
    if list(model.peft_config) == [name]:
        return model.unload()
    model.delete_adapter(name)
    return model
