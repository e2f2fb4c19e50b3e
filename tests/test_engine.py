"""The evaluation engine against the training model, on a tiny model trained for a few steps and
exported: exact integer layer products, logits within 1e-3, identical greedy tokens, KV-cache
decode equal to full recompute, on the AVX2 and scalar kernels and on the pure-torch fallback."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from bitnet_train import cli, quant
from bitnet_train.checkpoint import CheckpointError, write_manifest
from bitnet_train.config import compose_config
from bitnet_train.config import RunConfig
from bitnet_train.engine import Engine, Head, Sampling, generate, perplexity, read_documents, token_blocks
from bitnet_train.engine.weights import CPU_ONLY_HEADS
from bitnet_train.scoring import pair_logps, preference_metrics, task_accuracy
from bitnet_train.scoring.engine_scores import EngineCausalLM
from bitnet_train.data.chat import encode_pairs
from bitnet_train.data.chat_tasks import preference_pair, task_examples
from bitnet_train.export import export
from bitnet_train.export.source import load_training_model
from bitnet_train.kernels import cpu, cuda
from bitnet_train.ternary_layout import unpack_ternary
from bitnet_train.pipeline import run_pipeline
from conftest import TINY

BACKENDS = ["avx512", "avx2", "scalar", "torch"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def trained_final(tmp_path_factory) -> Path:
    """The quickstart pipeline on the tiny test model (hidden 64: every K is padded to 128)."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config([*TINY, "stages.pretrain.max_steps=40", "stages.pretrain.eval_every=40", f"output_dir={out}"])
    return run_pipeline(cfg)["pretrain"]


@pytest.fixture(scope="module")
def exported(trained_final, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export(trained_final, out, "own,own-1.6")
    return out


@pytest.fixture(scope="module")
def trained(trained_final):
    return load_training_model(trained_final)[0].eval()


@pytest.fixture(scope="module")
def engine(exported) -> Engine:
    return Engine.from_export(exported / "own", device="cpu")


@pytest.fixture(scope="module")
def tokenizer(exported):
    return AutoTokenizer.from_pretrained(exported / "own")


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> torch.Tensor:
    """Held-out built-in text, the data the model was trained on: logits far from uniform."""
    return token_blocks(tokenizer, read_documents("builtin"), 48)[:3]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Routes the CPU door through one backend: a compiled one, or the pure-torch fallback."""
    name = request.param
    if name == "torch":
        monkeypatch.setattr(cpu, "_ext", None)
        monkeypatch.setattr(cpu, "_warned", True)
    else:
        if cpu._ext is None or name not in cpu._ext.available_backends():
            pytest.skip(f"the compiled {name} backend is not available here")
        cpu._ext.set_backend(name)
        request.addfinalizer(lambda: cpu._ext.set_backend("auto"))
    assert cpu.backend() == name
    return name


def training_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- layer products


def test_fused_projections_keep_their_own_scales(engine, trained):
    """q/k/v (and gate/up) have different weight scales, so one shared scale would be caught."""
    attn = trained.model.layers[0].self_attn
    scales = [float(quant.weight_scale(m.weight.detach())) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert len(set(scales)) == 3
    qkv = engine.weights.layers[0].qkv
    expected = torch.cat([torch.full((n,), s) for n, s in zip(qkv.splits, scales)])
    assert torch.equal(qkv.row_scale, expected)


def test_every_layer_output_is_the_reference_integer_product(engine, trained, backend):
    """Each engine BitLinear output equals an int64 product of the training codes with
    quant.quantize_int8's activations, rescaled as dot / (s_w * s_a): bit for bit."""
    x = torch.randn(5, engine.config.intermediate_size, generator=torch.Generator().manual_seed(3)) * 2
    for i, layer in enumerate(engine.weights.layers):
        block = trained.model.layers[i]
        fused = {
            "qkv": (layer.qkv, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]),
            "o": (layer.o, [block.self_attn.o_proj]),
            "gate_up": (layer.gate_up, [block.mlp.gate_proj, block.mlp.up_proj]),
            "down": (layer.down, [block.mlp.down_proj]),
        }
        for name, (lin, modules) in fused.items():
            xi = x[:, :lin.in_features]
            a, s_a = quant.quantize_int8(xi)
            outputs = engine.linear(xi, lin)
            assert len(outputs) == len(modules)
            for out, module in zip(outputs, modules):
                codes, s_w = quant.ternarize(module.weight.detach())
                dot = a.to(torch.int64) @ codes.to(torch.int64).T
                assert dot.abs().max() < 2**24  # exact in float32, so the float comparison is exact too
                expected = dot.float() / (s_w * s_a)
                assert torch.equal(out, expected), f"layer {i} {name} ({backend})"


def test_packed_codes_are_the_training_codes(engine, trained):
    layer, block = engine.weights.layers[1], trained.model.layers[1]
    codes = unpack_ternary(layer.gate_up.qweight, layer.gate_up.in_features)
    expected = torch.cat([quant.ternarize(m.weight.detach())[0] for m in (block.mlp.gate_proj, block.mlp.up_proj)])
    assert torch.equal(codes, expected)


# ---------------------------------------------------------------- whole model


def test_logits_match_the_training_forward(engine, trained, text_ids, backend):
    ours, ref = engine.forward(text_ids), training_logits(trained, text_ids)
    assert relative_error(ours, ref) < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_tokens_equal_the_training_models(engine, trained, text_ids, backend):
    for prompt in text_ids[:, :12]:
        with torch.no_grad():
            ref = trained.generate(prompt[None], max_new_tokens=16, do_sample=False, eos_token_id=None)[0, 12:]
        assert generate(engine, prompt.tolist(), 16) == ref.tolist()


def test_kv_cache_decode_equals_full_recompute(engine, text_ids, backend):
    ids = text_ids[:2, :24]
    full = engine.forward(ids)
    cache = engine.new_cache(2, 24)
    # A prefill, a chunk that continues the cache (the offset causal mask), then single tokens.
    steps = [engine.forward(ids[:, :10], cache), engine.forward(ids[:, 10:15], cache)]
    steps += [engine.forward(ids[:, t:t + 1], cache) for t in range(15, 24)]
    assert cache.length == 24
    # torch's SDPA reduces one new token and a whole sequence in different orders, and the int8
    # quantizer after it carries the last-bit differences on: 2.2e-5 on a Zen 3 VM (4e-7 compiled).
    assert relative_error(torch.cat(steps, dim=1), full) < (1e-4 if backend == "torch" else 1e-5)


def test_the_compiled_stack_times_its_pieces_only_when_asked(engine, text_ids):
    if engine.native is None or cpu.backend() == "torch":
        pytest.skip("the compiled kernels are not built here")
    cache = engine.new_cache(1, 8)
    engine.native.set_profiling(True)
    try:
        for t in range(3):
            engine.forward(text_ids[:1, t:t + 1], cache)
        profile = engine.native.profile()
    finally:
        engine.native.set_profiling(False)
    assert profile["steps"] == 3 and profile["gemv"] > 0 and profile["attention"] > 0 and profile["norms"] > 0
    engine.forward(text_ids[:1, 3:4], cache)
    assert engine.native.profile() == {**{name: 0.0 for name in profile if name != "steps"}, "steps": 0}


def test_the_compiled_stack_equals_the_torch_layers(engine, text_ids):
    """The CPU engine's two paths: every layer in one compiled call, or op by op in torch."""
    if engine.native is None or cpu.backend() == "torch":
        pytest.skip("the compiled kernels are not built here")
    cache = engine.new_cache(*text_ids.shape)
    compiled = engine.forward(text_ids, cache)
    keys = cache.k.clone()
    engine.native, stack = None, engine.native
    try:
        cache = engine.new_cache(*text_ids.shape)
        layered = engine.forward(text_ids, cache)
    finally:
        engine.native = stack
    assert agree_up_to_flipped_roundings(compiled, layered)
    assert torch.equal(compiled.argmax(-1), layered.argmax(-1))
    assert agree_up_to_flipped_roundings(keys, cache.k)  # both filled the cache alike


def test_attention_over_many_cached_positions(engine):
    """The compiled attention takes the cache 64 positions at a time and merges the chunks' softmaxes
    (kernels/cpu/decoder.cpp): over 200 positions, decode equals a full recompute, and both the torch
    layers."""
    if engine.native is None or cpu.backend() == "torch":
        pytest.skip("the compiled kernels are not built here")
    ids = torch.randint(0, engine.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    full = engine.forward(ids)
    cache = engine.new_cache(1, 200)
    steps = [engine.forward(ids[:, :130], cache)] + [engine.forward(ids[:, t:t + 1], cache) for t in range(130, 200)]
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-5
    engine.native, stack = None, engine.native
    try:
        layered = engine.forward(ids)
    finally:
        engine.native = stack
    assert agree_up_to_flipped_roundings(full, layered)


def test_rope_tables_hold_the_values_a_step_computes(engine):
    """The compiled path reads cos/sin from tables grown by doubling, not computed per step: bit for bit
    what RotaryEmbedding gives for those positions alone, or decode would drift from a full recompute."""
    cos, sin = engine._rope_tables(300)
    assert cos.shape[0] >= 300 and engine._rope_tables(10)[0] is cos  # no recompute for fewer positions
    for start, length in ((0, 1), (1, 1), (77, 5), (299, 1), (0, 48)):
        step = engine.rotary(torch.arange(start, start + length).view(1, length), torch.float32)
        assert torch.equal(step[0][0, 0], cos[start:start + length])
        assert torch.equal(step[1][0, 0], sin[start:start + length])


def agree_up_to_flipped_roundings(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The compiled RMSNorm sums in another order than torch's: an ulp apart, which can tip an
    int8 activation rounding and move what follows by about one int8 step (1/127 of the range).
    Measured on the 40-step model: logits 2e-4 at most (median 2e-9), keys 2e-3 at most (median 0);
    1 or 2 threads change which roundings tip. Most values agree to float precision."""
    diff = (a - b).abs() / b.abs().max()
    return float(diff.median()) < 1e-6 and float(diff.max()) < 2e-2


def test_decode_streams_its_weights_and_cache_from_huge_pages(exported, text_ids):
    """The decoder's grouped weights, the head and the KV cache are read whole every decode step:
    they live on 2 MB pages where the kernel gives them (kernels/cpu/stream_arena.h)."""
    from test_cpu_kernels import transparent_huge_pages

    engine = Engine.from_export(exported / "own", head_dtype="int8", device="cpu")
    if engine.native is None or not transparent_huge_pages():
        pytest.skip("needs the compiled kernels and transparent huge pages")
    cache = engine.new_cache(1, 4096)  # 2 x 2 MB of the tiny model's keys, so whole huge pages
    engine.forward(text_ids[:1], cache)
    assert engine.native.huge_page_bytes() > 0
    for buffer in (engine.weights.head.weight, cache.k, cache.v):
        assert cpu._ext.huge_page_bytes(buffer.view(-1).view(torch.uint8).numpy()) > 0


def test_the_compiled_stack_names_a_wrong_cache(engine):
    if engine.native is None:
        pytest.skip("the compiled kernels are not built here")
    c = engine.config
    x = torch.zeros(1, 2, c.hidden_size)
    tables = torch.zeros(2, engine.head_dim).numpy()
    wrong = torch.zeros(c.num_hidden_layers, 2, engine.n_kv_heads, 8, engine.head_dim).numpy()  # batch 2, not 1
    with pytest.raises(ValueError, match="caches must be"):
        engine.native.forward(x.numpy(), tables, tables, wrong, wrong, 0)
    right = torch.zeros(c.num_hidden_layers, 1, engine.n_kv_heads, 8, engine.head_dim).numpy()
    with pytest.raises(ValueError, match="do not fit a cache of 8"):
        engine.native.forward(x.numpy(), tables, tables, right, right, 7)


def test_the_1_6_bit_export_runs_identically(exported, engine, text_ids):
    base3 = Engine.from_export(exported / "own-1.6", device="cpu")
    assert torch.equal(base3.forward(text_ids), engine.forward(text_ids))


@pytest.mark.parametrize("head_dtype, bound, argmax_agreement",
                         [("bf16", 1e-2, 0.97), ("int8", 2e-2, 0.97), ("int4", 0.1, 0.9), ("ternary", 0.4, 0.8)])
def test_smaller_head_types_stay_close(exported, engine, text_ids, head_dtype, bound, argmax_agreement):
    small = Engine.from_export(exported / "own", head_dtype=head_dtype, device="cpu")
    ref, ours = engine.forward(text_ids), small.forward(text_ids)
    err = relative_error(ours, ref)
    assert 0 < err < bound  # nonzero: the head really is stored in the smaller type
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= argmax_agreement


@pytest.mark.parametrize("head_dtype", CPU_ONLY_HEADS)
def test_cpu_only_heads_are_refused_elsewhere(head_dtype):
    head = Head.from_float(torch.randn(8, 64), head_dtype)
    with pytest.raises(ValueError, match="CPU kernels only"):
        head.to("cuda")


def test_perplexity_equals_the_training_models_loss(engine, trained, tokenizer):
    blocks = token_blocks(tokenizer, read_documents("builtin")[:6], 32)
    ours = perplexity(engine, blocks, batch_size=4)
    with torch.no_grad():
        ref = trained(blocks, labels=blocks).loss
    assert ours.tokens == blocks.numel() - len(blocks)
    assert ours.loss == pytest.approx(float(ref), rel=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine, text_ids):
    prompt = text_ids[0, :8].tolist()
    hot = Sampling(temperature=1.5, seed=7)
    assert generate(engine, prompt, 12, hot) == generate(engine, prompt, 12, hot)
    assert generate(engine, prompt, 12, Sampling(temperature=1.5, seed=8)) != generate(engine, prompt, 12, hot)
    assert generate(engine, prompt, 12, Sampling(temperature=1.0, top_k=1, seed=1)) == generate(engine, prompt, 12)


def test_generation_stops_at_a_stop_token(engine, text_ids):
    prompt = text_ids[0, :8].tolist()
    free = generate(engine, prompt, 10)
    assert generate(engine, prompt, 10, stop_ids=(free[3],))[-1] == free[3]


# ---------------------------------------------------------------- the quickstart's evaluations


def test_task_and_preference_evaluation_agree_with_the_training_model(engine, trained, tokenizer):
    tasks = task_examples(10, held_out=True, seed=0)
    wrapped = EngineCausalLM(engine)
    assert task_accuracy(wrapped, tokenizer, tasks) == task_accuracy(trained, tokenizer, tasks)
    pairs = encode_pairs(tokenizer, map(preference_pair, tasks), 128, "test pairs")
    ours, ref = pair_logps(wrapped, tokenizer, pairs), pair_logps(trained, tokenizer, pairs)
    assert relative_error(ours, ref) < 1e-3


# ---------------------------------------------------------------- bad inputs


def copy_export(exported, tmp_path) -> Path:
    return shutil.copytree(exported / "own", tmp_path / "own")


def test_missing_weights_file_is_named(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        Engine.from_export(d, device="cpu")


def test_corrupt_weights_file_is_named(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        Engine.from_export(d, device="cpu")


def test_a_training_checkpoint_is_refused_with_what_to_do(trained_final):
    with pytest.raises(CheckpointError, match="bitnet-train export"):
        Engine.from_export(trained_final, device="cpu")


def test_invalid_codes_name_the_tensor(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.qweight"][0, 0] = 0b11  # the 2-bit code 3
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "bitnet-train-packed", "layout": "2bit"})
    write_manifest(d)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.qweight is malformed"):
        Engine.from_export(d, device="cpu")


def rewrite_metadata(d: Path, **metadata) -> None:
    tensors = load_file(d / "model.safetensors")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "bitnet-train-packed", **metadata})
    write_manifest(d)


def test_a_version_1_export_still_runs(exported, engine, text_ids, tmp_path):
    """Files from before converted models had no version key: their config defaults are 2B4T's."""
    d = copy_export(exported, tmp_path)
    rewrite_metadata(d, layout="2bit")
    assert torch.equal(Engine.from_export(d, device="cpu").forward(text_ids), engine.forward(text_ids))


def test_a_newer_format_version_is_refused_with_what_to_do(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    rewrite_metadata(d, layout="2bit", version="3")
    with pytest.raises(CheckpointError, match="version 3; this bitnet-train reads versions 1 to 2: upgrade"):
        Engine.from_export(d, device="cpu")


def test_weights_from_another_config_are_named(exported, tmp_path):
    d = copy_export(exported, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(config))
    write_manifest(d)
    with pytest.raises(CheckpointError, match=r"gate_proj\.qweight has shape .* do not belong together"):
        Engine.from_export(d, device="cpu")


def test_a_full_cache_is_named(engine):
    cache = engine.new_cache(1, 4)
    engine.forward(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        engine.forward(torch.tensor([[4, 5]]), cache)


# ---------------------------------------------------------------- command line


def test_eval_command_prints_perplexity_and_a_generation(exported, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bitnet-train", "eval", str(exported / "own"), "--ppl", "builtin",
                                     "--generate", "The", "--max-new-tokens", "5", "--device", "cpu"])
    cli.main()
    out = capsys.readouterr().out
    assert "perplexity" in out and "generation" in out


def test_eval_tasks_command_scores_the_reports_examples(exported, trained, tokenizer, monkeypatch, capsys):
    """`eval --tasks` draws the held-out examples with the run's default seed, as the report does,
    so its numbers are the training model's on the same examples."""
    monkeypatch.setattr("sys.argv", ["bitnet-train", "eval", str(exported / "own"), "--tasks",
                                     "--num-examples", "10", "--device", "cpu"])
    cli.main()
    printed = json.loads(capsys.readouterr().out.split("tasks: ", 1)[1])
    tasks = task_examples(10, held_out=True, seed=RunConfig.seed)
    pairs = encode_pairs(tokenizer, map(preference_pair, tasks), 128, "test pairs")
    expected = {**task_accuracy(trained, tokenizer, tasks), **preference_metrics(pair_logps(trained, tokenizer, pairs))}
    assert printed.keys() == expected.keys()
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, abs=1e-3), key


def test_eval_command_names_a_missing_export_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bitnet-train", "eval", str(tmp_path / "nope"), "--ppl", "builtin"])
    with pytest.raises(SystemExit, match="nope is not a directory; pass an export made by `bitnet-train export`"):
        cli.main()


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not cuda.is_available(), reason=f"CUDA door unavailable: {cuda.unavailable_reason()}")
def test_the_cuda_door_runs_the_same_engine(exported, engine, trained, text_ids):
    gpu = Engine.from_export(exported / "own")  # picks the CUDA door by itself
    assert gpu.device.type == "cuda"
    ours = gpu.forward(text_ids).cpu()
    assert relative_error(ours, training_logits(trained, text_ids)) < 1e-3
    assert generate(gpu, text_ids[0, :12].tolist(), 16) == generate(engine, text_ids[0, :12].tolist(), 16)
