"""`bitnet-train bench train-gpu`'s CPU-side logic: the model variants it compares, its batch
choice and its table. The timing itself needs a GPU (kernels/cuda/gpu_session.sh runs it)."""
import warnings

import pytest
import torch

from bitnet_train.bench import train_step as bench
from bitnet_train.cli import bench_main
from bitnet_train.estimate import ModelShape, memory_per_gpu
from bitnet_train.model_factory import named_model_config
from bitnet_train.quant import BitLinear

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, bos_token_id=None, eos_token_id=None)
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def bitlinears(model):
    return [m for m in model.modules() if isinstance(m, BitLinear)]


def test_baseline_and_pure_torch_qat_differ_only_in_quantize():
    bf16, qat = bench.build_variant("bf16", TINY, "cpu"), bench.build_variant("qat-torch", TINY, "cpu")
    assert all(not m.quantize for m in bitlinears(bf16)) and all(m.quantize for m in bitlinears(qat))
    assert all(m.fused is None for m in bitlinears(qat))
    for (name, p), q in zip(bf16.state_dict().items(), qat.state_dict().values()):
        assert torch.equal(p, q), name  # same seed, same initial weights


def test_fused_qat_uses_the_triton_bitlinear(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set_bitlinear_kernel refuses Triton without it on a CPU
    model = bench.build_variant("qat-triton", TINY, "cpu")
    assert len(bitlinears(model)) == 2 * LINEARS_PER_LAYER
    assert all(m.quantize and m.fused is not None for m in bitlinears(model))


def test_torchao_variant_quantizes_every_bitlinear_once():
    pytest.importorskip("torchao")
    from torchao.prototype.quantized_training.bitnet import BitNetTrainingLinearWeight

    model = bench.build_variant("torchao", TINY, "cpu")
    layers = bitlinears(model)
    assert len(layers) == 2 * LINEARS_PER_LAYER
    assert all(isinstance(m.weight, BitNetTrainingLinearWeight) and not m.quantize for m in layers)
    assert not isinstance(model.lm_head.weight, BitNetTrainingLinearWeight)  # the head stays full precision


def test_onebitllms_variant_swaps_every_bitlinear_keeping_names_and_weights():
    onebitllms = pytest.importorskip("onebitllms")
    model = bench.build_variant("onebitllms", TINY, "cpu")
    reference = bench.build_variant("qat-torch", TINY, "cpu")
    assert bitlinears(model) == []
    assert sum(isinstance(m, onebitllms.BitNetLinear) for m in model.modules()) == 2 * LINEARS_PER_LAYER
    assert list(model.state_dict()) == list(reference.state_dict())
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name


def test_auto_batch_is_the_largest_power_of_two_within_80_percent():
    shape = ModelShape.from_config(named_model_config("700m", bench.LLAMA3_VOCAB), bench.LLAMA3_VOCAB)
    gpu = 141e9
    batch = bench.auto_batch(shape, 2048, gpu)
    assert batch & (batch - 1) == 0
    assert memory_per_gpu(shape, "single_gpu", 1, batch * 2048, False).total <= 0.8 * gpu
    assert memory_per_gpu(shape, "single_gpu", 1, 2 * batch * 2048, False).total > 0.8 * gpu
    assert bench.auto_batch(shape, 2048, gpu / 2) < batch


def test_table_gives_ratios_to_the_first_baseline_and_names_failures():
    rows = [bench.Row("700m", "bf16", 8, 2048, step_s=0.5, peak_gib=40.0),
            bench.Row("700m", "qat-triton", 8, 2048, step_s=0.45, peak_gib=38.0),
            bench.Row("700m", "torchao", 8, 2048, error="out of memory"),
            bench.Row("700m", "bf16", 8, 2048, step_s=0.51, peak_gib=40.0)]
    lines = bench.table(rows, peak=989.0).splitlines()
    assert "| 700m | bf16 | 8 x 2048 | 500.0 | 32,768 | 1.00x | 40.0 |" in lines[2]
    assert "| 0.90x | 38.0 |" in lines[3]
    assert "failed: out of memory" in lines[4]
    assert "| 1.02x |" in lines[5]


def test_mfu_is_model_flops_over_the_peak():
    row = bench.Row("700m", "bf16", 8, 2048, step_s=1.0, peak_gib=1.0)
    shape = ModelShape.from_config(named_model_config("700m", bench.LLAMA3_VOCAB), bench.LLAMA3_VOCAB)
    # 6 FLOPs per matmul parameter per token, the head included, plus causal attention
    matmul_params = shape.layers * shape.block_params + shape.vocab * shape.hidden
    flops = (6 * matmul_params + 6 * shape.layers * 2048 * shape.hidden) * 8 * 2048
    assert bench.mfu(row, 989.0) == pytest.approx(flops / 989e12)
    assert bench.mfu(row, None) is None
    assert bench.peak_tflops("NVIDIA H200") == 989.0 and bench.peak_tflops("Some GPU") is None


def test_train_gpu_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="train-gpu: needs a CUDA GPU and torch sees none"):
        bench_main(["train-gpu", "--models", "700m"])


def test_train_gpu_answers_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["train-gpu", "--help"])
    assert exit_.value.code == 0 and "torchao" in capsys.readouterr().out


def test_compiled_rows_compare_with_the_compiled_baseline():
    rows = [bench.Row("700m", "bf16", 8, 2048, step_s=0.5, peak_gib=40.0),
            bench.Row("700m", "bf16", 8, 2048, compiled=True, step_s=0.4, peak_gib=30.0),
            bench.Row("700m", "qat-triton", 8, 2048, compiled=True, step_s=0.44, peak_gib=30.0)]
    lines = bench.table(rows, peak=None).splitlines()
    assert "| 700m | qat-triton (compiled) | 8 x 2048 | 440.0 |" in lines[4] and "| 1.10x |" in lines[4]
    assert lines[4].endswith("| n/a | 0 |")  # no MFU without a known peak; no host syncs recorded


def test_chunked_loss_rows_compare_with_the_chunked_baseline():
    rows = [bench.Row("2b4t", "bf16", 4, 2048, step_s=1.0, peak_gib=80.0),
            bench.Row("2b4t", "bf16", 4, 2048, chunked_ce=True, step_s=0.8, peak_gib=60.0),
            bench.Row("2b4t", "qat-triton", 4, 2048, chunked_ce=True, step_s=0.8, peak_gib=60.0)]
    assert "| 2b4t | qat-triton (chunked CE) | 4 x 2048 | 800.0 |" in bench.table(rows, None).splitlines()[4]
    assert "| 1.00x |" in bench.table(rows, None).splitlines()[4]


def test_the_steps_chunked_loss_is_the_models_loss():
    model = bench.build_variant("qat-torch", TINY, "cpu")
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bench.step_loss(model, ids, chunked_ce=True), bench.step_loss(model, ids, False))


def test_host_sync_sites_name_the_waiting_line(monkeypatch):
    # On the CPU, torch's sync debug mode never fires: stand in for it with the warning it gives.
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def step():
        for _ in range(2):  # the same line twice: one site
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")

    sites = bench.host_sync_sites(step)
    assert len(sites) == 1 and sites[0].endswith("test_bench_train_gpu.py:" + str(step.__code__.co_firstlineno + 2))


def test_an_out_of_memory_variant_reruns_every_variant_at_half_the_batch(monkeypatch):
    calls = []

    def fake_time_variant(model, variant, base, batch, seq, steps, warmup, compiled, chunked_ce):
        calls.append((variant, batch))
        fits = variant != "qat-torch" or batch <= 2
        return bench.Row(model, variant, batch, seq, step_s=0.1 if fits else None, peak_gib=1.0 if fits else None,
                         error=None if fits else "out of memory")

    monkeypatch.setattr(bench, "time_variant", fake_time_variant)
    rows = bench.time_model("700m", ["qat-torch", "bf16"], batch=8, seq=64, steps=1, warmup=0,
                            compiled=False, chunked_ce=False)
    assert [(r.variant, r.batch) for r in rows] == [("bf16", 2), ("qat-torch", 2), ("bf16", 2)]
    assert calls[:3] == [("bf16", 8), ("qat-torch", 8), ("bf16", 8)] and len(calls) == 9
