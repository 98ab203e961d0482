import pytest
import torch

from shl.models import load_model


def randomize_lora(model, name, seed, scale=0.3):
    """Give adapter `name` non-zero random A and B (a fresh LoRA has B = 0: it changes nothing)."""
    from shl.history import lora_pairs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for A, B, _ in lora_pairs(model, name):
            A.copy_(scale * torch.randn(A.shape, generator=g))
            B.copy_(scale * torch.randn(B.shape, generator=g))


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-random", "float32", "cpu")


@pytest.fixture(scope="session")
def embedded():
    return load_model("smollm2-135m-instruct", "float32", "cpu")
