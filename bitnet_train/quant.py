"""BitNet b1.58 quantization: the one place the ternary and int8 maths live.

Training, export and the kernels' references all call these functions, so the codes a kernel
reads are bit-identical to the ones the training forward used.

Weights, per tensor (absmean):  s = 1 / mean|W|,   W_q = clamp(round(W * s), -1, 1) / s
Activations, per token (absmax): s = 127 / max|x|, x_q = clamp(round(x * s), -128, 127) / s

Conversion of a pretrained model warms the quantizers up (Hugging Face's 1.58-bit Llama write-up):
the forward sees x + λ·(q(x) − x), λ rising from 0 (the full-precision teacher) to 1 (ternary).

torch.round rounds half to even, as bitnet.cpp's activation quantizer does; every kernel must
round the same way. The maths runs in float32 whatever the training dtype, so a bf16 run and
the fp32 exporter see the same codes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5
INT8_MIN, INT8_MAX = -128, 127


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """The absmean multiplier s = 1 / mean|W| (a 0-dim float32 tensor)."""
    return 1.0 / w.float().abs().mean().clamp(min=EPS)


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, 1} (float32) and the scale s, with W_q = codes / s."""
    s = weight_scale(w)
    return (w.float() * s).round().clamp(-1, 1), s


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantized weight: ternary values times one per-tensor scale."""
    codes, s = ternarize(w)
    return (codes / s).to(w.dtype)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax multiplier s = 127 / max|x| over the last dim (float32, keepdim)."""
    return 127.0 / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8-valued activations (as float32) and their per-token scale, with x_q = q / s."""
    s = activation_scale(x)
    return (x.float() * s).round().clamp(INT8_MIN, INT8_MAX), s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_q = q / s in `dtype`: the value every fake-quant path multiplies by."""
    return (q.float() / s).to(dtype)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantized activation: per-token int8 values times one scale per token."""
    return dequantize_int8(*quantize_int8(x), x.dtype)


def straight_through(x: torch.Tensor, xq: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Forward x + λ·(xq − x), backward identity: gradients reach the latent full-precision tensor.

    λ = `strength`; at 1 this is exactly x + (xq − x) (multiplying by 1.0 is exact in floating point).
    """
    return x + strength * (xq - x).detach()


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      strength: float = 1.0) -> torch.Tensor:
    """The reference BitLinear: fake-quantized weight and input through straight_through, then a
    Linear. Autograd saves both fake-quantized operands for the backward, a full copy of the
    weight and of the input in the compute dtype; at λ = 1 `ternary_linear` computes the same
    without them. The warm-up's blend (λ < 1) needs the latent input, so it runs this."""
    w = straight_through(weight, quantize_weight(weight), strength)
    x = straight_through(x, quantize_activation(x), strength)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


class TernaryLinear(torch.autograd.Function):
    """fake_quant_linear at λ = 1, saving for the backward only the input's int8 codes and scales
    and a reference to the latent weight: 1 byte per input element instead of 4 (fp32) or 2
    (bf16), and no per-layer copy of the weight, which FSDP would otherwise keep unsharded until
    the backward. The backward rebuilds the operands the forward multiplied, bit for bit:
    x + (x_q - x) is exactly x_q (x_q is within a factor of two of x, or 0, so the difference is
    exact: Sterbenz), and the weight's is recomputed by the same code. Under autocast the product
    runs in the autocast dtype, as in the reference, and the gradients are cast back the same way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        codes, scale = quantize_int8(x)
        x_q = dequantize_int8(codes, scale, x.dtype)
        out = F.linear(x_q, ternary_weight(weight).to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(codes.to(torch.int8), scale, weight)
        ctx.dtypes = x.dtype, out.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        codes, scale, weight = ctx.saved_tensors
        x_dtype, compute, bias_dtype = ctx.dtypes
        grad = grad.to(compute)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ ternary_weight(weight).to(x_dtype).to(compute)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x_q = dequantize_int8(codes, scale, x_dtype).to(compute)
            grad_w = (grad.flatten(0, -2).t() @ x_q.flatten(0, -2)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.flatten(0, -2).sum(0).to(bias_dtype)
        return grad_x, grad_w, grad_b


def ternary_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight operand of BitLinear's product at λ = 1: the value straight_through gives."""
    with torch.no_grad():
        return straight_through(weight, quantize_weight(weight))


def ternary_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return TernaryLinear.apply(x, weight, bias)


class BitLinear(nn.Linear):
    """A Linear whose weights are ternary and inputs int8 in the forward pass.

    The input is expected to be RMS-normalised already: in 2B4T every BitLinear sits behind one
    of the model's RMSNorms (input_layernorm, attn_sub_norm, post_attention_layernorm,
    ffn_sub_norm), which keeps the parameter names identical to the Hugging Face checkpoints.
    `quantize=False` gives the full-precision baseline with the same parameters. A bias (Qwen2's
    q/k/v) is added in full precision after the ternary product, as llama.cpp and transformers do.
    `strength` is the warm-up's λ (set_quant_strength); 1 outside a conversion.
    At λ = 1 it runs `fused`, set_bitlinear_kernel's Triton forward, or else ternary_linear
    (the same maths, and both save only int8 codes for the backward).
    """

    fused = None

    def __init__(self, in_features: int, out_features: int, quantize: bool = True, bias: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.quantize = quantize
        self.strength = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return F.linear(x, self.weight, self.bias)
        if self.strength != 1.0:  # the warm-up's blend needs the latent input saved
            return fake_quant_linear(x, self.weight, self.bias, self.strength)
        return (self.fused or ternary_linear)(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize={self.quantize}"


def set_quant_strength(model: nn.Module, strength: float) -> None:
    """Set λ of every BitLinear in `model`: 0 computes in full precision, 1 is the ternary forward."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"quantizer strength λ={strength} is outside [0, 1]")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.strength = strength


def set_bitlinear_kernel(model: nn.Module, kernel: str) -> None:
    """How every BitLinear in `model` computes: "torch" (the fake-quant forward above, any device)
    or "triton" (kernels/triton_bitlinear.py: int8 tensor-core GEMM on CUDA, the same results)."""
    if kernel == "triton":
        from .kernels.triton_support import require_triton

        require_triton("model.bitlinear_kernel=triton")
        from .kernels.triton_bitlinear import bitlinear as fused
    elif kernel == "torch":
        fused = None
    else:
        raise ValueError(f"bitlinear kernel {kernel!r} is unknown; use torch or triton")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.fused = fused


def warmup_strength(step: int, warmup_steps: int) -> float:
    """λ = min(step / warmup_steps, 1) (Hugging Face 1.58-bit write-up); warmup_steps=0: always 1."""
    return 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
