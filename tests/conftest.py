"""Shared fixtures: tiny random models of every family, and the real built-in models (slow)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from cltrace.models.tiny import FAMILY_NAMES, tiny_model  # noqa: E402


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def gemma():
    from cltrace.models.registry import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm():
    from cltrace.models.registry import load_model

    return load_model("smollm2-135m")
