"""`cltrace eval --corpus FILE --split`: a user's file is evaluated whole by default (its hash-held-out part alone
is usually empty), any split can be named, and the built-in corpus keeps its held-out default. Tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cltrace.data.corpus import open_corpus
from cltrace.data.tokens import split_docs
from cltrace.training.evaluate import default_split, eval_contexts


def _write_text_file(path, n_docs: int = 2) -> list[str]:
    """A .txt of ~4,400-character paragraphs, each its own document (two would pass 8,000), with a marker word."""
    rng = random.Random(0)
    words = ["river", "stone", "field", "lamp", "winter", "harbor", "paper", "signal"]
    paras = []
    markers = []
    for d in range(n_docs):
        marker = f"MARKER{d}"
        markers.append(marker)
        paras.append(f"{marker} " + " ".join(rng.choice(words) for _ in range(730)))
    path.write_text("\n\n".join(paras) + "\n")
    return markers


def _tiny_transcoder_folder(tmp_path, model_dir):
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import save_transcoder
    from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

    model = load_model(str(model_dir))
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(kind="clt", n_layers=model.n_layers, d_model=model.d_model, n_features=16,
                                     activation="relu", model_name=str(model_dir)))
    return save_transcoder(tc, tmp_path / "tc"), model, tc


def test_default_split_is_eval_for_builtin_corpora_and_all_for_a_local_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello\n")
    assert default_split(None) == "eval" and default_split("small") == "eval" and default_split("large") == "eval"
    assert default_split("owner/dataset") == "eval" and default_split("hf:owner/dataset") == "eval"
    assert default_split(str(f)) == "all" and default_split(str(tmp_path)) == "all"


def test_eval_reads_a_whole_user_file_where_its_held_out_split_is_empty(tmp_path, capsys):
    from cltrace.cli import main
    from cltrace.models.tiny import save_tiny

    text_file = tmp_path / "held_out.txt"
    markers = _write_text_file(text_file)
    docs = list(open_corpus(str(text_file)))
    assert len(docs) == 2 and not list(split_docs(iter(docs), "eval", 0.02))  # the issue: nothing is held out
    model_dir = save_tiny("llama", tmp_path / "tiny")
    folder, model, tc = _tiny_transcoder_folder(tmp_path, model_dir)
    common = ["eval", str(folder), "--model", str(model_dir), "--corpus", str(text_file), "--context-len", "64",
              "--json"]

    # the held-out split alone has no context: the old behaviour, now only when asked for
    assert main(common + ["--tokens", "256", "--split", "eval"]) == 2
    assert "no context of 64 tokens" in capsys.readouterr().err

    # the default for a file is the whole file; enough tokens to reach every document
    n_tokens = 64 * 200
    assert main(common + ["--tokens", str(n_tokens)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "all"
    ids = eval_contexts(model, str(text_file), n_tokens, 64, split="all")
    assert res["n_predictions"] == ids.shape[0] * 63
    text = "".join(model.tokenizer.decode(row) for row in ids.tolist())
    assert all(m in text for m in markers)  # every document of the file was read
    # the per-prompt statistic against a splice written out from the weights (test_training.spliced_argmaxes)
    from test_training import spliced_argmaxes

    clean, spliced = spliced_argmaxes(model, tc, ids)
    assert res["n_contexts"] == ids.shape[0]
    assert res["last_top1_agreement"] * ids.shape[0] == pytest.approx(int((clean[:, -1] == spliced[:, -1]).sum()))

    # --split train of the same file is the same documents here (none is held out)
    assert torch.equal(eval_contexts(model, str(text_file), n_tokens, 64, split="train"), ids)


def test_eval_contexts_takes_exactly_n_contexts_or_says_the_split_holds_fewer(tmp_path, capsys):
    """--contexts N: the first N contexts of the split (the same as asking for N·T tokens), and a one-line error
    naming how many there are when the split holds fewer."""
    from cltrace.cli import main
    from cltrace.errors import CltraceError
    from cltrace.models.registry import load_model
    from cltrace.models.tiny import save_tiny

    text_file = tmp_path / "held_out.txt"
    _write_text_file(text_file, n_docs=3)
    model = load_model(str(save_tiny("llama", tmp_path / "tiny")))
    every = eval_contexts(model, str(text_file), 10**6, 32, split="all")  # all there are
    n = every.shape[0]
    assert n > 4
    for want in (1, 3, n):
        got = eval_contexts(model, str(text_file), 64, 32, split="all", n_contexts=want)  # n_tokens is ignored
        assert got.shape == (want, 32) and torch.equal(got, every[:want])
    with pytest.raises(CltraceError, match=f"holds {n} contexts of 32 tokens, not {n + 1}"):
        eval_contexts(model, str(text_file), 64, 32, split="all", n_contexts=n + 1)
    assert main(["eval", str(tmp_path / "nowhere"), "--model", "x", "--contexts", "0"]) == 2
    assert "--contexts" in capsys.readouterr().err  # refused before looking for the folder
