"""The CLI: global options, predict, models, and one-line errors."""

from __future__ import annotations

import json

import pytest

from cltrace import __version__
from cltrace.cli import main
from cltrace.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny-llama"))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_predict_json(tiny_folder, capsys):
    assert main(["--device", "cpu", "predict", "hello world", "--model", tiny_folder, "--top", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and set(rows[0]) == {"token", "id", "prob"}
    # the model's own next-token distribution, computed here
    import torch

    from cltrace.models.registry import load_model

    model = load_model(tiny_folder)
    with torch.no_grad():
        top = torch.softmax(model.logits(model.tokenize("hello world"))[0, -1], -1).topk(3)
    assert [r["id"] for r in rows] == top.indices.tolist()
    assert [r["prob"] for r in rows] == pytest.approx(top.values.tolist(), rel=1e-5)


def test_predict_text(tiny_folder, capsys):
    assert main(["-q", "predict", "hello", "--model", tiny_folder, "--top", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert names[0] == "gemma-3-270m" and "smollm2-135m" in names


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "hi", "--model", "/no/such/folder"], "unknown model"),
        (["--device", "cuda:7", "predict", "hi"], "no CUDA GPU"),
        (["predict", "  ", "--model", "TINY"], "empty"),
    ],
)
def test_user_errors_are_one_line(argv, message, tiny_folder, capsys):
    import torch

    if "cuda" in argv[1] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [tiny_folder if a == "TINY" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("cltrace: error:")


def test_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "hi", "--top", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid int value" in err and "--help" in err


def test_every_subcommand_has_help(capsys):
    from cltrace.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_corpus_info_counts_the_committed_corpus(capsys):
    assert main(["corpus", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] > 1000 and 1_000_000 < info["approx_tokens"] < 2_500_000


def test_corpus_info_missing_file_is_one_line(capsys, tmp_path):
    assert main(["corpus", "info", str(tmp_path / "none.jsonl")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cache_then_train_from_it(tiny_folder, tmp_path, capsys):
    """`cltrace cache` writes rows that `train --cache` reads; the cached rows equal the model's own activations."""
    import torch

    from cltrace.data import CachedActivations
    from cltrace.models.registry import load_model

    out = tmp_path / "acts"
    argv = ["-q", "cache", "--model", tiny_folder, "--tokens", "300", "--context-len", "16", "--out", str(out),
            "--precision", "fp32"]
    assert main(argv) == 0
    assert "train --cache" in capsys.readouterr().out
    cache = CachedActivations(out)
    assert cache.n_tokens == 300 and cache.manifest["precision"] == "fp32"
    # a second write into the same folder is refused unless --overwrite
    assert main(["-q", "cache", "--model", tiny_folder, "--tokens", "10", "--out", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err
    # every cached x row is one of the model's MLP inputs (bf16-rounded) on the same contexts
    model = load_model(tiny_folder)
    x, _ = next(cache.batches(8, seed=0))
    from cltrace.data import StreamingActivations

    ids = torch.tensor(StreamingActivations(model, None, context_len=16).contexts().take(40))  # what cache ran
    trace = model.forward(ids, stop_at_layer=model.n_layers)
    xs = torch.stack(trace.mlp_in, 2).reshape(-1, model.n_layers, model.d_model).bfloat16().float()  # [B·T, L, D]
    for row in x:  # equal up to one bf16 rounding step (the model batches differ, so float sums may too)
        assert torch.isclose(xs, row, rtol=2**-7, atol=1e-6).flatten(1).all(1).any()
    assert main(["-q", "train", "--cache", str(out), "--model", tiny_folder, "-F", "32", "--tokens", "256",
                 "--batch-size", "64", "--out", str(tmp_path / "tc"), "--no-progress"]) == 0
    assert (tmp_path / "tc" / "transcoder.safetensors").exists()
    # the default precision is bf16 exactly where bf16 matmuls are native
    from cltrace.runtime import fast_bf16

    assert main(["-q", "cache", "--model", tiny_folder, "--tokens", "50", "--out", str(tmp_path / "auto")]) == 0
    assert CachedActivations(tmp_path / "auto").manifest["precision"] == ("bf16" if fast_bf16("cpu") else "fp32")
