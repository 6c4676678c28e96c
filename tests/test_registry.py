"""Model specs: built-in names, local folders, GGUF paths and hub ids, and their errors."""

from __future__ import annotations

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.models import registry
from cltrace.models.tiny import save_tiny


def test_local_folder_loads(tmp_path):
    folder = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    model = registry.load_model(str(folder))
    assert model.family.name == "qwen2" and model.n_layers == 4
    ids = model.tokenize("hello")
    torch.testing.assert_close(model.forward(ids).logits, model.logits(ids), rtol=1e-5, atol=1e-5)


def test_resolve_errors(tmp_path):
    with pytest.raises(CltraceError, match="unknown model"):
        registry.resolve("no-such-model")
    with pytest.raises(CltraceError, match="no GGUF file"):
        registry.resolve(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CltraceError, match="not a model folder"):
        registry.resolve(str(tmp_path / "empty"))
    with pytest.raises(CltraceError, match="unknown built-in"):
        registry.prepare("nope")


def test_gguf_path_resolves_to_folder_and_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert registry.resolve(str(f)) == ("m", str(tmp_path.resolve()), "m.gguf")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert registry.resolve("someone/some-model") == ("someone/some-model", "someone/some-model", None)
    with pytest.raises(CltraceError, match="could not load model 'someone/some-model'"):
        registry.load_model("someone/some-model")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path))
    assert registry.model_dir("gemma-3-270m") == tmp_path / "models" / "gemma-3-270m"
    rows = registry.list_models()
    assert {r["name"] for r in rows} == {"gemma-3-270m", "smollm2-135m"}
    assert not any(r["ready"] for r in rows)
