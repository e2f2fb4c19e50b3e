"""Benchmarks: `bitnet_train.bench.kernels` times the CPU kernels against torch float32."""
