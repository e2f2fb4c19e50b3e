"""The fused Triton BitLinear (kernels/triton_bitlinear.py) against the fake-quant reference (quant.py).

Without a GPU the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set here
before the kernels are imported, since triton.jit reads it then), so CI checks the same kernel
source; with a GPU they are compiled and run on it. Tests marked gpu need CUDA itself
(torch.compile, activation checkpointing at training shapes).

Tolerances: the codes must be identical. The fused output is the exact integer product scaled
by two correctly rounded float32 divisions and rounded once to the output dtype, so it is within
one rounding of that dtype (unit roundoff u = 2^-8 for bf16, 2^-24 for float32) of the exact value,
plus 2 float32 roundings. The reference rounds its operands q/s_x and c/s_w to the compute dtype
before the GEMM (relative error u each, so 2u + u^2 per product term) and accumulates in float32,
so it may differ from the exact value by 2u * sum_k |x_q w_q| + u |y|; the comparison allows the
sum of both bounds, element by element.
"""
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:  # before triton's first import, which reads it
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from bitnet_train import quant  # noqa: E402
from bitnet_train.kernels import triton_bitlinear as tb  # noqa: E402
from bitnet_train.kernels.triton_support import require_triton  # noqa: E402
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
gpu = pytest.mark.gpu


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def exact_output(x, w):
    """The reference's codes multiplied in float64: the value both paths approximate."""
    q, sx = quant.quantize_int8(x)
    c, sw = quant.ternarize(w)
    return (q.double() @ c.double().T) / sx.double() / sw.double(), (q.abs().double() / sx) @ (c.abs().double().T / sw)


def fake_quant_reference(w, bias=None):
    layer = quant.BitLinear(w.shape[1], w.shape[0], bias=bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_and_scales_equal_the_reference(dtype):
    x = randn(37, 200, dtype=dtype, scale=3.0)
    q, s = tb.quantize_rows(x)
    ref_q, ref_s = quant.quantize_int8(x)
    assert q.dtype == torch.int8 and torch.equal(q.float(), ref_q)
    assert torch.equal(s, ref_s[:, 0])


def test_activation_ties_round_half_to_even():
    # Row max 127 makes s exactly 1, so the halves below are exact ties.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=DEVICE)
    q, _ = tb.quantize_rows(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]
    assert torch.equal(q.float(), quant.quantize_int8(x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_codes_and_scale_equal_the_reference(dtype):
    w = randn(45, 200, dtype=dtype, scale=0.02, seed=1)
    c, s = tb.ternarize_weight(w)
    ref_c, ref_s = quant.ternarize(w)
    assert c.dtype == torch.int8 and torch.equal(c.float(), ref_c) and torch.equal(s, ref_s)


def test_weight_ties_round_half_to_even():
    # mean|W| = 1 makes s exactly 1: 0.5 is a tie (to 0), 1.5 rounds to 2 and clamps to 1.
    w = torch.tensor([[0.5, 1.5, -0.5, -1.5], [0.5, 1.5, -0.5, -1.5]], device=DEVICE)
    c, _ = tb.ternarize_weight(w)
    assert c.tolist() == [[0, 1, 0, -1], [0, 1, 0, -1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_is_the_exact_product_rounded_once(dtype):
    # Shapes that are not multiples of any tile, and K spanning several K-steps.
    x, w = randn(37, 200, scale=2.0, seed=2), randn(45, 200, scale=0.02, seed=3)
    q, sx = tb.quantize_rows(x)
    c, sw = tb.ternarize_weight(w)
    y = tb.int8_matmul(q, c, sx, sw, dtype)
    exact, _ = exact_output(x, w)
    assert y.dtype == dtype
    err = (y.double() - exact).abs()
    assert (err <= (UNIT_ROUNDOFF[dtype] + 2.0**-22) * exact.abs() + 1e-30).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_the_fake_quant_reference(dtype):
    x, w = randn(3, 11, 96, dtype=dtype, seed=4), randn(70, 96, scale=0.02, seed=5)
    bias = randn(70, scale=0.1, seed=6)
    ref = fake_quant_reference(w, bias)(x)
    y = tb.bitlinear(x, w, bias)
    assert y.shape == ref.shape == (3, 11, 70) and y.dtype == ref.dtype == dtype
    exact, magnitude = exact_output(x.reshape(-1, 96), w)
    u = UNIT_ROUNDOFF[dtype]
    bound = 3 * u * magnitude + 2 * u * exact.abs() + 2 * u * bias.abs().double()  # module docstring
    assert ((y.double() - ref.double()).reshape(-1, 70).abs() <= bound).all()
    assert not torch.equal(y, torch.zeros_like(y))


def backward_pair(dtype, autocast: bool):
    """(output, input gradient, weight gradient) of the fused path and of the reference, for one
    random upstream gradient; float32 weights (the master copy) and x in `dtype`."""
    x0, g = randn(2, 9, 64, dtype=dtype, seed=7), randn(2, 9, 48, seed=9)
    out = []
    for fused in (True, False):
        x, layer = x0.clone().requires_grad_(), fake_quant_reference(randn(48, 64, scale=0.02, seed=8))
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y = tb.bitlinear(x, layer.weight) if fused else layer(x)
        y.backward(g.to(y.dtype))
        out.append((y, x.grad, layer.weight.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_the_reference_straight_through_estimator(dtype):
    (y, gx, gw), (ref_y, ref_gx, ref_gw) = backward_pair(dtype, autocast=False)
    assert gx.dtype == ref_gx.dtype and gw.dtype == ref_gw.dtype
    u = UNIT_ROUNDOFF[dtype]
    # Same dequantized operands and the same GEMMs: only the reference's fp32 w + (w_q - w) may
    # differ from w_q in its last bit, so the gradients agree to a few roundings of the dtype.
    torch.testing.assert_close(gx, ref_gx, rtol=4 * u, atol=4 * u * ref_gx.abs().max().item())
    torch.testing.assert_close(gw, ref_gw, rtol=4 * u, atol=4 * u * ref_gw.abs().max().item())


def test_autocast_computes_in_bf16_like_f_linear():
    (y, gx, gw), (ref_y, ref_gx, ref_gw) = backward_pair(torch.float32, autocast=True)
    assert y.dtype == ref_y.dtype == torch.bfloat16
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    u = UNIT_ROUNDOFF[torch.bfloat16]
    torch.testing.assert_close(gx, ref_gx, rtol=4 * u, atol=4 * u * ref_gx.abs().max().item())
    torch.testing.assert_close(gw, ref_gw, rtol=4 * u, atol=4 * u * ref_gw.abs().max().item())


def tiny_model(kernel: str) -> BitNetTrainForCausalLM:
    torch.manual_seed(0)
    cfg = BitNetTrainConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                            bos_token_id=None, eos_token_id=None)
    model = BitNetTrainForCausalLM(cfg).to(DEVICE)
    quant.set_bitlinear_kernel(model, kernel)
    return model


def test_model_trains_the_same_with_either_kernel():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for kernel in ("triton", "torch"):
        model = tiny_model(kernel)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_warmup_strength_below_one_falls_back_to_the_reference():
    model = tiny_model("triton")
    layer = model.model.layers[0].mlp.down_proj
    x = randn(5, layer.in_features, seed=10)
    layer.strength = 0.5
    fused_call = layer.fused
    layer.fused = None
    ref = layer(x)
    layer.fused = fused_call
    assert torch.equal(layer(x), ref)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="bitlinear kernel 'trition' is unknown; use torch or triton"):
        quant.set_bitlinear_kernel(tiny_model("torch"), "trition")


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="model.bitlinear_kernel=triton: Triton kernels need a CUDA GPU"):
        require_triton("model.bitlinear_kernel=triton")


@gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_torch_compile_and_checkpointing_match_eager():
    ids = torch.randint(0, 64, (4, 32), device="cuda")
    eager = tiny_model("triton")
    compiled = tiny_model("triton")
    compiled.activation_checkpointing_enable()
    compiled = torch.compile(compiled)
    losses = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-2)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=1e-4, msg=name)


@gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_training_shapes_match_the_reference_on_gpu():
    # 2B4T's gate/up shape at 2048 tokens, bf16: the autotuned tensor-core tiles.
    x, w = randn(2048, 2560, dtype=torch.bfloat16, seed=11), randn(6912, 2560, scale=0.02, seed=12)
    q, sx = tb.quantize_rows(x)
    c, sw = tb.ternarize_weight(w)
    assert torch.equal(q.float(), quant.quantize_int8(x)[0]) and torch.equal(c.float(), quant.ternarize(w)[0])
    y = tb.int8_matmul(q, c, sx, sw, torch.bfloat16)
    exact, _ = exact_output(x, w)
    assert ((y.double() - exact).abs() <= (2.0**-8 + 2.0**-22) * exact.abs()).all()


def test_start_up_refuses_triton_where_it_cannot_run(monkeypatch):
    from bitnet_train.config import ConfigError, compose_config
    from bitnet_train.pipeline import validate_run

    cfg = compose_config(["model.bitlinear_kernel=triton"])
    validate_run(cfg)  # runnable here: a GPU or the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.bitlinear_kernel=triton: Triton kernels need a CUDA GPU"):
        validate_run(cfg)


def test_a_misspelt_kernel_fails_composition():
    from bitnet_train.config import compose_config

    with pytest.raises(Exception, match="bitlinear_kernel"):
        compose_config(["model.bitlinear_kernel=trition"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_operands_are_the_references_bit_for_bit(dtype):
    x, w = randn(37, 200, scale=2.0, seed=13), randn(45, 200, scale=0.02, seed=14)
    q, sx = tb.quantize_rows(x)
    c, sw = tb.ternarize_weight(w)
    assert torch.equal(tb.dequantize(q, sx, dtype), quant.quantize_activation(x).to(dtype))
    assert torch.equal(tb.dequantize(c, sw, dtype), quant.quantize_weight(w).to(dtype))


@pytest.mark.skipif(ON_GPU, reason="on a GPU the tests above run the compiled kernels themselves")
def test_kernels_compile_for_hopper_on_int8_tensor_cores_without_spills():
    # Triton's compiler and bundled ptxas need no GPU; the interpreter above cannot run them.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bitnet_train.kernels.triton_compile_check", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sm_90 int8_matmul" in done.stdout and "triton_compile_check: OK" in done.stdout


@gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_fused_forward_and_backward_never_wait_for_the_gpu():
    x = randn(512, 1024, dtype=torch.bfloat16, seed=15).requires_grad_()
    w = randn(2048, 1024, scale=0.02, seed=16).requires_grad_()
    tb.bitlinear(x, w).sum().backward()  # the autotuner times its tiles (with syncs) on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tb.bitlinear(x, w).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_activation_checkpointing_recomputes_the_same_gradients():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = []
    for checkpointing in (True, False):
        model = tiny_model("triton")
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name
