"""Inference kernels for ternary weights x int8 activations, one small door per device.

- `bitnet_train.kernels.cpu`: compiled AVX2 kernels (kernels/cpu, built by `pip install`),
  falling back to a pure-torch reference.
- `bitnet_train.kernels.cuda`: the W2A8 CUDA kernels (kernels/cuda).

Each door offers quantize_activations(x), ternary_matmul_int(a, qweight) and
bitlinear(x, qweight, qscale, in_features) with the same results. Weights are in the packed
layout of docs/formats.md (bitnet_train.ternary_layout); quantization follows bitnet_train.quant.
"""
