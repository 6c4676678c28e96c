"""The issue's 'done when', on the real default model (Gemma-3-270M) and the committed corpus, through the CLI:
a CLT and a PLT train, a run killed mid-way resumes to the same weights as an uninterrupted one, `eval --json`
gives every metric, and the result round-trips through circuit-tracer's format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cltrace.cli import main
from cltrace.transcoders.circuit_tracer_format import export_circuit_tracer, load_circuit_tracer
from cltrace.transcoders.io import load_transcoder

pytestmark = pytest.mark.slow


def _argv(kind: str, out) -> list[str]:
    return ["-q", "train", "--model", "gemma-3-270m", "--kind", kind, "-F", "32", "--activation", "batchtopk",
            "--k", "4", "--tokens", "3072", "--batch-size", "256", "--checkpoint-every", "2", "--no-progress",
            "--set", "norm_tokens=256", "--set", "shuffle_buffer=1024", "--out", str(out)]


def _kill_after_first_checkpoint(argv: list[str], out) -> None:
    """Run `cltrace train` in a subprocess and kill it (SIGKILL: no cleanup) once a checkpoint is on disk."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "cltrace", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "LATEST"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert latest.exists(), "the run wrote no checkpoint before it ended"
    assert not (out / "transcoder.safetensors").exists(), "the run finished before it could be interrupted"


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_cli_train_resume_eval_round_trip_on_gemma(kind, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_argv(kind, whole)) == 0
    _kill_after_first_checkpoint(_argv(kind, cut)[1:], cut)
    assert main(_argv(kind, cut) + ["--resume"]) == 0
    a, b = load_file(str(whole / "transcoder.safetensors")), load_file(str(cut / "transcoder.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k

    capsys.readouterr()
    assert main(["-q", "eval", str(cut), "--tokens", "512", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    for key in ("nmse", "explained_variance", "l0", "dead_fraction", "ce_increase", "kl", "top1_agreement"):
        assert isinstance(ev[key], float) and ev[key] == ev[key], key  # present and not NaN
    assert len(ev["nmse_layers"]) == 18 and 0 < ev["l0"] < 32 and 0 <= ev["top1_agreement"] <= 1

    tc = load_transcoder(cut)
    export_circuit_tracer(tc, tmp_path / "ct", model_name="gemma-3-270m")
    back = load_circuit_tracer(tmp_path / "ct")
    x = torch.randn(64, 18, 640) * 30
    with torch.no_grad():
        assert torch.allclose(back(x)[1], tc(x)[1], atol=1e-4, rtol=1e-4)
