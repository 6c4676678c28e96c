"""Shared fixtures: the device the tests run on, tiny random models of every family, and the real built-in
models (slow).

Device: `pytest --device cuda` (or cuda:N, cpu; default cpu) runs the core tests (models, transcoders, training,
replacement, attribution, interventions) with their models, transcoders and tensors on that device; the
`device` fixture (a torch.device) gives it to a test. A test that asks for CUDA on a machine without it is
skipped with the reason; the default, cpu, never skips. Tests that are CPU-only by nature (gloo process groups,
CLI subprocesses, glibc's malloc, graph files) do not take the fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS under --device cuda
torch.set_num_threads(min(2, torch.get_num_threads()))

from cltrace.models.tiny import FAMILY_NAMES, tiny_model  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device of the core tests' models and tensors: cpu (default), cuda, cuda:N")


def pytest_configure(config):
    name = config.getoption("--device")
    try:
        torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(f"--device {name!r} is not a torch device ({e}): use cpu, cuda or cuda:N") from e


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The --device of this run; skips only when CUDA was asked for and this machine has none (or not that one)."""
    name = request.config.getoption("--device")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"--device {name} asked for, but torch.cuda.is_available() is False on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            pytest.skip(f"--device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


@pytest.fixture(scope="session")
def tiny_on(device):
    """tiny_on(family, **kw): `cltrace.models.tiny.tiny_model(family, **kw)` with its weights on `device`
    (built on the CPU first, so its random weights are the same on every device)."""

    def build(family: str = "llama", **kw):
        model = tiny_model(family, **kw)
        model.hf.to(device)
        return model

    return build


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family, tiny_on):
    return tiny_on(family)


@pytest.fixture(scope="session")
def gemma():
    from cltrace.models.registry import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm():
    from cltrace.models.registry import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def viewer_served(tmp_path_factory):
    """The viewer tests' served folder: tiny model, transcoders, feature database, graphs (tests/viewer_setup.py)."""
    from viewer_setup import build

    return build(tmp_path_factory.mktemp("viewer"))
