"""Batched generation: one `generate` call per batch, left-padded."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from shl.models import input_device


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def generate_texts(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   progress: bool = True, desc: str = "generate") -> list[str]:
    """Completions (special tokens stripped) for rendered prompts; greedy unless do_sample.

    No repetition penalty: repetition is a symptom the filter must see, not hide.
    """
    old_side, tok.padding_side = tok.padding_side, "left"
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    outputs = []
    try:
        for chunk in tqdm(list(batches(prompts, batch_size)), desc=desc, disable=not progress, leave=False):
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(input_device(model))
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 top_k=None, **sampling)
            # [B, prompt_len + new]: the prompt part is identical width for every row under left padding
            outputs += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return outputs
