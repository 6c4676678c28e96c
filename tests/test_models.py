"""The model adapter against HF's own forward: captures, patching, frozen mode, Jacobians."""

from __future__ import annotations

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.models.adapter import ModelAdapter
from cltrace.models.tiny import byte_tokenizer, tiny_hf_model, tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog."


def _hf_captures(model: ModelAdapter, ids: torch.Tensor):
    """MLP inputs and block MLP contributions as HF's own forward computes them (via module hooks)."""
    ins, outs, handles = {}, {}, []
    gemma = model.family.name.startswith("gemma")
    for l, block in enumerate(model.blocks):
        mlp = block.mlp
        out_module = block.post_feedforward_layernorm if gemma else mlp
        handles.append(mlp.register_forward_pre_hook(lambda m, a, l=l: ins.__setitem__(l, a[0].detach())))
        handles.append(out_module.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o.detach())))
    try:
        with torch.no_grad():
            res = model.hf(input_ids=ids[None], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return ins, outs, res


def test_forward_matches_hf(tiny):
    ids = tiny.tokenize(PROMPT)
    with torch.no_grad():
        trace = tiny.forward(ids)
    ins, outs, res = _hf_captures(tiny, ids)
    torch.testing.assert_close(trace.logits, res.logits, rtol=1e-5, atol=1e-5)
    for l in range(tiny.n_layers):
        torch.testing.assert_close(trace.mlp_in[l], ins[l], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trace.mlp_out[l], outs[l], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(trace.resid_pre[l], res.hidden_states[l], rtol=1e-5, atol=1e-6)
    # what the MLP adds is exactly the residual stream's step from mid to the next block
    for l in range(tiny.n_layers - 1):
        step = trace.resid_pre[l + 1] - trace.resid_mid[l]
        torch.testing.assert_close(step, trace.mlp_out[l], rtol=1e-5, atol=1e-5)


def test_patching_own_outputs_reproduces_logits(tiny):
    ids = tiny.tokenize(PROMPT)
    _, outs, res = _hf_captures(tiny, ids)
    with torch.no_grad():
        patched = tiny.forward(ids, mlp_hook=lambda l, x, y: outs[l].clone())
        broken = tiny.forward(ids, mlp_hook=lambda l, x, y: torch.zeros_like(y) if l == 1 else y)
    torch.testing.assert_close(patched.logits, res.logits, rtol=1e-5, atol=1e-5)
    assert (broken.logits - res.logits).abs().max() > 1e-3  # the hook really replaces the MLP output


def test_logits_equal_the_cpu_logits(tiny, family):
    """The same model on the CPU (under --device cpu, the same computation twice)."""
    ids = tiny.tokenize(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(ids).cpu(), tiny_model(family).logits(ids.cpu()), rtol=1e-4, atol=1e-4)


def test_frozen_mode_same_values(tiny):
    ids = tiny.tokenize(PROMPT)
    with torch.no_grad():
        ref = tiny.forward(ids)
        frozen = tiny.forward(ids, frozen=ref.frozen)
    torch.testing.assert_close(frozen.logits, ref.logits, rtol=0, atol=1e-6)
    for a, b in zip(frozen.mlp_in, ref.mlp_in):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _frozen_map(model, ids, ref, src_layer: int, src_pos: int, dst_layer: int):
    """v [D] added to MLP output (src_layer, src_pos) -> MLP input of dst_layer at the last position."""

    def f(v: torch.Tensor) -> torch.Tensor:
        def hook(l, x, y):
            y = ref.mlp_out[l].clone()  # the MLP is replaced by its recorded output (+ v at the source)
            if l == src_layer:
                y[0, src_pos] = y[0, src_pos] + v
            return y

        trace = model.forward(ids, mlp_hook=hook, frozen=ref.frozen, stop_at_layer=dst_layer + 1)
        return trace.mlp_in[dst_layer][0, -1]

    return f


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen3"])
def test_frozen_gradients_match_direct_jacobian(family, tiny_on, device):
    model = tiny_on(family, dtype=torch.float64)
    ids = model.tokenize(PROMPT)[:12]
    with torch.no_grad():
        ref = model.forward(ids)
    f = _frozen_map(model, ids, ref, src_layer=0, src_pos=5, dst_layer=2)
    D = model.d_model
    # autograd through the frozen forward, one backward per output coordinate
    v = torch.zeros(D, dtype=torch.float64, device=device, requires_grad=True)
    out = f(v)
    J_auto = torch.stack([torch.autograd.grad(out[i], v, retain_graph=True)[0] for i in range(D)])
    # direct: central differences of the frozen map, which is linear, so they are exact up to rounding
    eps = 1e-3
    with torch.no_grad():
        J_fd = torch.stack(
            [(f(eps * e) - f(-eps * e)) / (2 * eps) for e in torch.eye(D, dtype=torch.float64, device=device)], dim=1
        )
        a, b = torch.randn(D, dtype=torch.float64).to(device), torch.randn(D, dtype=torch.float64).to(device)
        zero = torch.zeros(D, dtype=torch.float64, device=device)
        nonlinearity = (f(a + b) - f(a) - f(b) + f(zero)).abs().max()
    torch.testing.assert_close(J_auto, J_fd, rtol=1e-6, atol=1e-9)
    assert nonlinearity < 1e-9  # frozen: affine in the MLP outputs
    # unfrozen, the same map is not affine: freezing is what makes it linear
    def f_live(v):
        def hook(l, x, y):
            y = ref.mlp_out[l].clone()
            if l == 0:
                y[0, 5] = y[0, 5] + v
            return y
        return model.forward(ids, mlp_hook=hook, stop_at_layer=3).mlp_in[2][0, -1]
    with torch.no_grad():
        live = (f_live(a + b) - f_live(a) - f_live(b) + f_live(zero)).abs().max()
    assert live > 1e-6


def test_tokenize_adds_bos_and_checks_length(tiny):
    ids = tiny.tokenize("ab")
    tok = tiny.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert ids[0].item() == bos and tiny.decode(ids[1:]) == ["a", "b"]
    assert tiny.tokenize("ab").tolist() == ids.tolist()  # BOS is not added twice
    with pytest.raises(CltraceError, match="empty"):
        tiny.tokenize("   ")
    with pytest.raises(CltraceError, match="at most"):
        tiny.tokenize("x" * 600)


def test_unsupported_architecture_is_named():  # no computation: CPU only
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    hf = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(CltraceError, match="unsupported architecture 'mistral'.*llama"):
        ModelAdapter(hf, byte_tokenizer(), "m")


def test_bfloat16_forward_close_to_hf(device):
    hf = tiny_hf_model("llama", dtype=torch.bfloat16).to(device)
    model = ModelAdapter(hf, byte_tokenizer(), "tiny-llama-bf16")
    ids = model.tokenize(PROMPT)
    with torch.no_grad():
        ours = model.forward(ids).logits.float()
    ref = model.logits(ids).float()
    assert (ours - ref).abs().max() < 0.1
