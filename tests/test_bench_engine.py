"""The engine benchmark's machinery (not its speed): the llama.cpp baseline gets the same weights,
and the report pairs rounds. Runs on a small model of 2B4T's kind."""
import importlib.util

import gguf
import numpy as np
import pytest
import torch

from bitnet_train.bench import engine as bench
from bitnet_train.export import gguf_format
from bitnet_train.ternary_layout import unpack_ternary

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)  # every in_features a multiple of TQ2_0's 256
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install -e .[bench])")


@pytest.fixture(scope="module")
def small():
    return bench.random_2b4t(**SMALL)


def test_tq2_blocks_are_our_codes_with_scale_one_over_s(small):
    engine, _ = small
    down = engine.weights.layers[0].down
    s = float(down.row_scale[0])
    blocks = bench.tq2_blocks(down.qweight, s)
    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.TQ2_0)
    codes = unpack_ternary(down.qweight, down.in_features)
    assert np.array_equal(values, codes.numpy() * np.float32(np.float16(1 / s)))


def test_the_gguf_holds_every_projection_with_its_own_scale(small, tmp_path):
    engine, embed = small
    bench.write_tq2_gguf(engine, embed, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    qkv = engine.weights.layers[1].qkv
    for name, start, rows in (("q_proj", 0, 256), ("k_proj", 256, 128), ("v_proj", 384, 128)):
        t = tensors[gguf_format.gguf_name(f"model.layers.1.self_attn.{name}.weight")]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        codes = unpack_ternary(qkv.qweight[start:start + rows], qkv.in_features).numpy()
        assert np.array_equal(values, codes * np.float32(np.float16(1 / float(qkv.row_scale[start])))), name
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_our_runners_measure_error_against_the_fp32_head(small):
    engine, embed = small
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    fp32, int8 = bench.our_runners(engine, embed, ["fp32", "int8"], prompt, 4)
    assert fp32.logits_rel_error == 0 and fp32.greedy_agreement == 1
    assert 0 < int8.logits_rel_error < 2e-2
    assert int8.bytes_per_token < fp32.bytes_per_token


def test_bytes_per_token_count_the_kv_cache_a_decode_step_reads(small):
    """Steps at positions 8 .. 11 attend over 9 .. 12 cached positions: 10.5 on average, keys and values of
    2 layers x 2 KV heads x 64 dimensions, float32."""
    engine, embed = small
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    (runner,) = bench.our_runners(engine, embed, ["int8"], prompt, 4)
    head = bench.Head.from_float(embed, "int8")
    assert runner.bytes_per_token - bench.layer_bytes(engine) - head.nbytes == 10.5 * 2 * 2 * 2 * 64 * 4


def test_rounds_run_every_engine_and_pair_ratios(small):
    engine, embed = small
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    runners = bench.our_runners(engine, embed, ["fp32", "int4"], prompt, 3)
    runners[1].engine = "llama.cpp"  # stands in for the baseline: the pairing is what is tested
    probes = iter(range(10, 100))
    bandwidth = bench.run_rounds(runners, prompt, 3, rounds=3, bandwidth=lambda: float(next(probes)))
    assert [len(r.runs) for r in runners] == [3, 3] and bandwidth == list(range(10, 17))  # one before, one after each
    # Round 0 runs fp32 then int4, round 1 int4 then fp32: each run is set against its own two probes.
    assert [g.read_gbs for g in runners[0].runs] == [10.5, 13.5, 14.5]
    assert [g.read_gbs for g in runners[1].runs] == [11.5, 12.5, 15.5]
    table = bench.format_table(runners, 1, bandwidth, 8, 3, (0.0, 0.0, 0.0))
    assert "| fp32 | int4 |" in table and "3 interleaved rounds" in table


def test_share_of_read_bandwidth_is_paired_with_each_generation(small):
    """Each generation's decode speed is set against the bandwidth probed around it, not a mean of all."""
    engine, embed = small
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    runner = bench.our_runners(engine, embed, ["fp32"], prompt, 2)[0]
    runner.runs = [bench.Generation(1.0, 2 / t, None, [], read_gbs=gbs) for t, gbs in ((10.0, 10.0), (20.0, 40.0))]
    runner.bytes_per_token = 10**9  # 1 GB: 10 and 20 GB/s
    table = bench.format_table([runner], 1, [10.0, 40.0], 8, 2, (0.0, 0.0, 0.0))
    assert "| 75 (50-100)% |" in table  # 10/10 and 20/40, not 15 / 25 = 60%


def test_read_bandwidth_probes_give_a_rate():
    """bench engine's reference bandwidth: torch's read, and the compiled kernels' streamed read (timed
    here, in the benchmark layer) where the extension is built."""
    from bitnet_train.bench.kernels import stream_read_gbs
    from bitnet_train.kernels import cpu

    assert bench.read_gbs(1 << 24, reps=2) > 0
    assert (stream_read_gbs(1 << 24, reps=2) > 0) == (cpu.backend() != "torch")


@needs_llama
def test_llama_cpp_runs_the_same_model_with_both_heads(small, tmp_path):
    engine, embed = small
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    runners = bench.llama_runners(engine, embed, ["f16", "q6_k"], tmp_path, 8, 4, threads=1)
    for r in runners:
        generation = r.generate(prompt, 4)
        assert len(generation.tokens) == 4 and all(0 <= t < 1000 for t in generation.tokens)
    assert runners[1].bytes_per_token < runners[0].bytes_per_token


def test_profile_splits_a_decode_step_into_its_pieces(small):
    engine, embed = small
    if engine.native is None or bench.cpu.backend() == "torch":
        pytest.skip("the profile times the compiled decoder, which is not built here")
    native, head = engine.native, bench.Head.from_float(embed, "int8")
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    ms = bench.profile_decode(engine, head, prompt, 4)
    assert {"norms", "quantize", "gemv", "attention", "rope_cache", "glu", "residual", "head"} <= set(ms)
    assert ms["gemv"] > 0 and ms["attention"] > 0 and ms["head"] > 0
    assert min(ms.values()) >= 0
    # The engine is as it was: its own decoder and head, the timers off and reset.
    assert engine.native is native and engine.weights.head is head
    assert native.profile()["steps"] == 0
    table = bench.format_profile({"int8": ms}, bench.layer_bytes(engine), {"int8": head.nbytes}, 10.0)
    assert "| gemv |" in table and "| head streams |" in table
