import pytest
import torch

from shl.models import load_model


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-random", "float32", "cpu")


@pytest.fixture(scope="session")
def embedded():
    return load_model("smollm2-135m-instruct", "float32", "cpu")
