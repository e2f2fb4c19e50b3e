"""Inference kernels for ternary weights x int8 activations, one small door per device.

- `bitnet_train.kernels.cpu`: quantize_activations, ternary_matmul_int, bitlinear, backend;
  compiled AVX2 kernels (kernels/cpu) with a pure-torch fallback.

Weights are in the packed layout of docs/formats.md (bitnet_train.packing), quantization follows
bitnet_train.quant; each door keeps a torch reference beside it that its tests compare against.
"""
