import torch
import torch.nn.functional as F

from bitnet_train.quant import (
    BitLinear,
    quantize_activation,
    quantize_int8,
    quantize_weight,
    straight_through,
    ternarize,
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
