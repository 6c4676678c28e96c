"""circuit-tracer transcoder folders: round trip, and their reconstruction formula gives ours."""

import pytest
import torch
from safetensors.torch import load_file

from cltrace.errors import CltraceError
from cltrace.transcoders.circuit_tracer_format import export_circuit_tracer, load_circuit_tracer
from cltrace.transcoders.io import load_transcoder
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

L, D, F, N = 3, 16, 24, 7


def make(kind: str, skip: bool = False) -> Transcoder:
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(kind=kind, n_layers=L, d_model=D, n_features=F, skip=skip,
                                     reads="resid_mid")).eval()
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.1)
        tc.b_dec.normal_(0, 0.1)
        tc.log_threshold.normal_(-2, 0.5)
        if skip:
            tc.W_skip.normal_(0, 0.1)
    return tc


def ct_reconstruction(folder, kind: str, x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's formula (HOW_IT_WORKS §1) from the raw files: x [N, L, D] -> [N, L, D]."""
    if kind == "plt":
        out = []
        for i in range(L):
            sd = load_file(f"{folder}/layer_{i}.safetensors")
            pre = x[:, i] @ sd["W_enc"].T + sd["b_enc"]
            a = pre * (pre > sd["activation_function.threshold"])  # JumpReLU, θ raw, strict >
            y = a @ sd["W_dec"] + sd["b_dec"]
            if "W_skip" in sd:
                y = y + x[:, i] @ sd["W_skip"].T
            out.append(y)
        return torch.stack(out, 1)
    acts = []
    for i in range(L):
        sd = load_file(f"{folder}/W_enc_{i}.safetensors")
        pre = x[:, i] @ sd[f"W_enc_{i}"].T + sd[f"b_enc_{i}"]
        acts.append(pre * (pre > sd[f"threshold_{i}"]))
    out = []
    for layer in range(L):
        y = load_file(f"{folder}/W_enc_{layer}.safetensors")[f"b_dec_{layer}"].expand(x.shape[0], D).clone()
        for i in range(layer + 1):
            W = load_file(f"{folder}/W_dec_{i}.safetensors")[f"W_dec_{i}"]  # [F, L − i, D]
            y = y + acts[i] @ W[:, layer - i]
        out.append(y)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", False), ("plt", True)])
def test_round_trip_and_reconstruction(tmp_path, kind, skip):
    tc = make(kind, skip)
    export_circuit_tracer(tc, tmp_path, model_name="tiny")
    back = load_circuit_tracer(tmp_path)
    assert back.cfg.kind == kind and back.cfg.reads == "resid_mid"
    assert back.cfg.model_name == "tiny" and (back.W_skip is not None) == skip
    for name, p in tc.named_parameters():
        assert torch.allclose(dict(back.named_parameters())[name], p, atol=1e-6), name
    x = torch.randn(N, L, D)
    with torch.no_grad():
        _, ours = tc(x)
    assert torch.allclose(ct_reconstruction(tmp_path, kind, x), ours, atol=1e-5)
    assert isinstance(load_transcoder(tmp_path), Transcoder)  # io falls back to this format


def test_relu_when_no_threshold(tmp_path):
    tc = make("plt")
    tc.cfg.activation = "relu"
    export_circuit_tracer(tc, tmp_path)
    assert "activation_function.threshold" not in load_file(f"{tmp_path}/layer_0.safetensors")
    assert load_circuit_tracer(tmp_path).cfg.activation == "relu"


def test_errors(tmp_path):
    tc = make("clt", skip=True)
    with pytest.raises(CltraceError, match="skip"):
        export_circuit_tracer(tc, tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: something_else\n")
    with pytest.raises(CltraceError):
        load_circuit_tracer(tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(CltraceError, match="layer_0"):
        load_circuit_tracer(tmp_path)
