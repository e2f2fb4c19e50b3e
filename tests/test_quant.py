import pytest
import torch
import torch.nn.functional as F

from bitnet_train.quant import (
    BitLinear,
    fake_quant_linear,
    quantize_activation,
    quantize_int8,
    quantize_weight,
    straight_through,
    ternarize,
    ternary_linear,
    weight_scale,
)


def test_quantized_weights_are_ternary_times_one_scale():
    w = torch.randn(48, 80)
    wq = quantize_weight(w)
    scale = 1 / weight_scale(w)
    codes = wq / scale
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert set(codes.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(ternarize(w)[0] / weight_scale(w), wq)


def test_weight_scale_is_inverse_absmean():
    w = torch.randn(16, 16)
    assert torch.allclose(weight_scale(w), 1 / w.abs().mean())
    assert weight_scale(torch.zeros(4, 4)) == 1e5  # clamped, no division by zero


def test_activations_stay_in_int8_range_per_token():
    x = torch.randn(5, 7, 64) * torch.logspace(-3, 3, 7)[None, :, None]
    q, s = quantize_int8(x)
    assert q.min() >= -128 and q.max() <= 127
    assert torch.equal(q, q.round())
    assert torch.equal(q.abs().amax(-1), torch.full((5, 7), 127.0))  # the absmax maps to 127
    assert s.shape == (5, 7, 1)
    assert torch.allclose(quantize_activation(x), x, rtol=0, atol=float((x.abs().amax(-1, keepdim=True) / 127).max()))


def test_rounding_is_half_to_even():
    # max|x| = 127 makes s exactly 1, so x*s is x: ties must go to the even neighbour.
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5]])
    q, s = quantize_int8(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127.0, 2.0, 4.0, -2.0, -4.0, 0.0, 2.0, -0.0]]
    # Weights: mean|W| = 1 makes s = 1; +-0.5 round to 0 (half away from zero would give +-1).
    w = torch.tensor([0.5, -0.5, 2.5, -1.5, 1.0, 1.0, 0.5, 0.5])
    assert weight_scale(w).item() == 1.0
    assert ternarize(w)[0].tolist() == [0.0, -0.0, 1.0, -1.0, 1.0, 1.0, 0.0, 0.0]


def test_gradients_pass_straight_through():
    w = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    (straight_through(w, quantize_weight(w)) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_bitlinear_forward_and_latent_gradient():
    layer = BitLinear(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    y = layer(x)
    expected = F.linear(quantize_activation(x), quantize_weight(layer.weight))
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    # STE: d/dW sum(x_q W_q^T) = sum over batch of x_q; d/dx = sum of W_q rows.
    assert torch.allclose(layer.weight.grad, quantize_activation(x).detach().sum(0).expand(16, 32), atol=1e-5)
    assert torch.allclose(x.grad, quantize_weight(layer.weight).detach().sum(0).expand(4, 32), atol=1e-5)
    assert layer.bias is None


def test_bitlinear_full_precision_switch():
    layer = BitLinear(32, 16, quantize=False)
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def ternary_and_reference(shape, bias: bool, autocast: bool, seed: int = 0):
    """Outputs and gradients of ternary_linear and of the fake-quant reference on one input."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, shape[-2])[:, None]
    x0[..., 0] *= 50  # one outlier per token sets its scale
    w0 = torch.randn(24, shape[-1], generator=gen) * 0.02
    w0[0, 0] = 5.0  # clamped to code 1: its straight-through value is not exactly code / s
    b0 = torch.randn(24, generator=gen) if bias else None
    results = []
    for linear in (fake_quant_linear, ternary_linear):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = linear(x, w, b)
        (y.float() * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append([y, x.grad, w.grad] + ([b.grad] if bias else []))
    return results


@pytest.mark.parametrize("shape", [(4, 32), (3, 17, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_ternary_linear_is_the_reference_bit_for_bit(shape, bias, autocast):
    reference, lean = ternary_and_reference(shape, bias, autocast)
    for want, got in zip(reference, lean):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_ternary_linear_saves_int8_codes_and_the_latent_weight_only():
    layer = BitLinear(64, 48)
    x = torch.randn(8, 16, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert [t.dtype for t in big] == [torch.int8]  # the input's codes, not a float copy
    weights = [t for t in saved if t.shape == layer.weight.shape]
    assert len(weights) == 1 and weights[0].data_ptr() == layer.weight.data_ptr()  # no copy
    assert sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != layer.weight.data_ptr()) \
        < x.numel() * 1.1  # about 1 byte per input element


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_input_is_exactly_its_quantized_value(dtype):
    # TernaryLinear saves only the codes because x + (x_q - x) == x_q: x_q is 0 or within a
    # factor of two of x, so x_q - x is exact (Sterbenz) and so is the sum.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 256, generator=gen) * torch.logspace(-6, 6, 4096)[:, None]).to(dtype)
    x_q = quantize_activation(x)
    assert torch.equal(straight_through(x, x_q), x_q)


def test_bitlinear_runs_the_reference_during_the_warmup():
    layer = BitLinear(32, 16)
    layer.strength = 0.5
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), fake_quant_linear(x, layer.weight, None, 0.5))
