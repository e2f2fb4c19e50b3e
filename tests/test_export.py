"""bitnet-train export: every format carries the training codes, loads back to the training
model's outputs, and every bad input is refused with the file, the tensor and what to do."""
import json
import shutil
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import torch._dynamo
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from transformers import AutoModelForCausalLM, BitNetForCausalLM

from bitnet_train.checkpoint import CheckpointError, verify_manifest, write_manifest
from bitnet_train.config import TokenizerConfig
from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.export import FORMATS, export, gguf_format, hf_format
from bitnet_train.export.cli import main as export_cli
from bitnet_train.export.own_format import PackedBitLinear, load_packed_model
from bitnet_train.export.sizes import (
    LLAMA3_VOCAB,
    PAPER_2B4T_NON_EMBEDDING_GB,
    non_embedding_bytes,
    ternary_shapes,
)
from bitnet_train.model_factory import named_model_config
from bitnet_train.export.source import TernaryWeight, load_training_model, read_checkpoint
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.model_factory import load_checkpoint_model
from bitnet_train.ternary_layout import base3_row_bytes, packed_row_bytes, unpack_ternary, unpack_ternary_base3, unpack_ternary_hf
from bitnet_train import quant
from bitnet_train.quant import BitLinear, ternarize
from bitnet_train.checkpoint import save_final

# Hidden and intermediate sizes are multiples of 256, GGUF's TQ block.
ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ALL = ",".join(FORMATS)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerConfig())


def tiny_model(tokenizer, seed=0, tie=True, **arch) -> BitNetTrainForCausalLM:
    torch.manual_seed(seed)
    config = BitNetTrainConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie, **{**ARCH, **arch},
    )
    return BitNetTrainForCausalLM(config)


def save_stage(tokenizer, stage_dir, **kw):
    """A stage's final/ directory, as the trainer writes it."""
    save_final(tiny_model(tokenizer, **kw), tokenizer, stage_dir / "final")
    return stage_dir / "final"


@pytest.fixture(scope="module")
def final(tmp_path_factory, tokenizer):
    return save_stage(tokenizer, tmp_path_factory.mktemp("run") / "pretrain")


@pytest.fixture(scope="module")
def exported(final, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return out, {r.label: r for r in export(final, out, ALL)}


@pytest.fixture(scope="module")
def out(exported):
    return exported[0]


@pytest.fixture(scope="module")
def ckpt(final):
    return read_checkpoint(final)


@pytest.fixture(scope="module")
def trained(final):
    return load_training_model(final)[0]


@pytest.fixture(scope="module")
def packed(out):
    return load_packed_model(out / "own")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))


def training_codes(model):
    return {f"{n}.weight": ternarize(m.weight.detach()) for n, m in model.named_modules() if isinstance(m, BitLinear)}


def copy_export(out, fmt, tmp_path):
    return shutil.copytree(out / fmt, tmp_path / fmt)


# --- the same codes as training, bit for bit, in every format --------------------------------

@pytest.mark.parametrize("fmt, unpack", [("own", unpack_ternary), ("own-1.6", unpack_ternary_base3)])
def test_own_formats_hold_the_training_codes_and_scales(out, trained, fmt, unpack):
    tensors = load_file(out / fmt / "model.safetensors")
    for name, (codes, s) in training_codes(trained).items():
        module = name.removesuffix(".weight")
        assert torch.equal(unpack(tensors[f"{module}.qweight"], codes.shape[1]), codes), name
        assert torch.equal(tensors[f"{module}.qscale"], s.reshape(1)), name


def test_hf_format_holds_the_training_codes_and_inverse_scales(out, trained):
    tensors = load_file(out / "hf" / "model.safetensors")
    for name, (codes, s) in training_codes(trained).items():
        assert torch.equal(unpack_ternary_hf(tensors[name]), codes), name
        assert torch.equal(tensors[name.replace(".weight", ".weight_scale")], (1 / s).reshape(1)), name
    assert "lm_head.weight" not in tensors  # tied: transformers ties it back


@pytest.mark.parametrize("fmt", ["gguf-tq2", "gguf-tq1"])
def test_gguf_dequantizes_to_training_codes_times_fp16_scale(out, trained, fmt):
    found = gguf_format.read_ternary(out / fmt)
    expected = training_codes(trained)
    assert set(found) == {gguf_format.gguf_name(n) for n in expected}
    for name, (codes, s) in expected.items():
        got_codes, got_scale = found[gguf_format.gguf_name(name)]
        assert torch.equal(got_codes, codes.to(torch.int8)), name
        assert got_scale == float(np.float16(1 / s))  # fp16 block scale: codes exact, scale to 11 bits
        assert abs(got_scale * float(s) - 1) <= 2**-11


# --- loading the export gives the training model's outputs -----------------------------------

@pytest.mark.parametrize("fmt", ["own", "own-1.6"])
def test_own_format_loads_to_the_training_forward(out, packed, trained, ids, fmt):
    model = packed if fmt == "own" else load_packed_model(out / fmt)
    assert all(isinstance(m, PackedBitLinear) for m in model.modules() if isinstance(m, BitLinear))
    with torch.no_grad():
        ours = model(ids).logits
        # Training adds (W_q - W) back onto W (straight-through), an ulp away from codes / s, and
        # an ulp can flip one int8 activation rounding in a later layer. The forward that
        # straight_through stands for (its value xq itself) is what the export must equal.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(quant, "straight_through", lambda x, xq, strength=1.0: xq)
            exact = trained(ids).logits
        rounded = trained(ids).logits
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, rounded, rtol=1e-3, atol=5e-2)  # at most a few flipped roundings
    assert (ours.argmax(-1) == rounded.argmax(-1)).float().mean() >= 0.95


def test_quantizing_packed_weights_again_would_shrink_them(packed, trained, ids):
    """Why PackedBitLinear exists: BitLinear re-derives s from codes / s and gets it wrong."""
    requantized = BitNetTrainForCausalLM(packed.config).eval()
    requantized.load_state_dict(packed.state_dict())
    with torch.no_grad():
        gap = (requantized(ids).logits - trained(ids).logits).abs().max()
    assert gap > 1e-2


def test_hf_format_loads_with_transformers_and_matches(out, trained, ids):
    with torch._dynamo.config.patch(disable=True):  # transformers' BitNet unpacking is torch.compile'd
        hf = AutoModelForCausalLM.from_pretrained(out / "hf")
        assert isinstance(hf, BitNetForCausalLM)
        assert hf.config.quantization_config.quantization_mode == "offline"
        with torch.no_grad():
            theirs, ours = hf(ids).logits, trained(ids).logits
    # AutoBitLinear multiplies by 1/s after the matmul, an ulp from our forward, and an ulp can
    # flip one int8 activation rounding, which moves later layers by an int8 step (measured on
    # this random model: max 0.03, median 9e-7). Most logits agree to float precision, argmax too.
    diff = (theirs - ours).abs()
    assert diff.median() < 1e-5 and diff.max() < 0.1
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.95


def test_untied_lm_head_is_exported_in_every_format(tokenizer, tmp_path, ids):
    final = save_stage(tokenizer, tmp_path / "pretrain", tie=False, seed=3)
    export(final, tmp_path / "out", "own,hf,gguf-tq2")
    trained = load_training_model(final)[0]
    with torch.no_grad():
        torch.testing.assert_close(load_packed_model(tmp_path / "out" / "own")(ids).logits, trained(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    head = trained.lm_head.weight.detach()
    assert torch.equal(load_file(tmp_path / "out" / "hf" / "model.safetensors")["lm_head.weight"], head)
    reader = gguf.GGUFReader(tmp_path / "out" / "gguf-tq2" / "model.gguf")
    output = next(t for t in reader.tensors if t.name == "output.weight")
    assert np.array_equal(np.asarray(output.data), head.numpy())


# --- GGUF: what a llama.cpp-family server needs ------------------------------------------------

def test_gguf_has_bitnet_architecture_tokenizer_and_ternary_tensor_types(out, tokenizer):
    reader = gguf.GGUFReader(out / "gguf-tq2" / "model.gguf")
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert field["general.architecture"] == "bitnet"
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ2_0
    expected = {"block_count": 2, "embedding_length": 256, "feed_forward_length": 512, "context_length": 64,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 64,
                "rope.freq_base": 500000.0, "vocab_size": len(tokenizer)}
    assert {k: field[f"bitnet.{k}"] for k in expected} == expected
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert field["tokenizer.ggml.token_type"][tokenizer.bos_token_id] == gguf.TokenType.CONTROL
    assert field["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert field["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(field["tokenizer.ggml.merges"]) > 0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.TQ2_0
    assert types["blk.0.attn_sub_norm.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert len(types) == 2 + 2 * 11  # embedding, final norm; 7 projections and 4 norms per layer


def test_gguf_refuses_a_scale_fp16_cannot_hold(ckpt):
    tiny_scale = TernaryWeight("model.layers.0.mlp.up_proj.weight", ckpt.ternary[0].codes, torch.tensor(1e6))
    with pytest.raises(CheckpointError, match=r"up_proj.*fp16.*own"):
        gguf_format.check(replace(ckpt, ternary=[tiny_scale]), gguf.GGMLQuantizationType.TQ2_0)


# --- sizes -----------------------------------------------------------------------------------

def test_size_report_gives_each_files_bytes_and_bits_per_weight(exported):
    r = exported[1]
    assert set(r) == set(FORMATS)
    for report in r.values():
        assert report.bytes == report.path.stat().st_size
        assert report.bits_per_weight == 8 * report.bytes / report.params
    bits = {k: v.non_embedding_bits_per_weight for k, v in r.items()}
    # 2 bits (+ fp32 scales and norms) for own and hf, 1.6 for base 3 (256 = 51.2 bytes, rounded up),
    # 2.0625 / 1.6875 for TQ2_0 / TQ1_0.
    assert 2.0 < bits["own"] == bits["hf"] < 2.1
    assert 1.625 < bits["own-1.6"] < bits["gguf-tq1"] < 1.8 < bits["own"] < bits["gguf-tq2"] < 2.15


def test_2b4t_estimate_from_the_config_alone():
    config = named_model_config("2b4t", LLAMA3_VOCAB)
    assert sum(o * i for o, i in ternary_shapes(config)) == 30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560)
    two_bit, base3 = non_embedding_bytes(config, packed_row_bytes), non_embedding_bytes(config, base3_row_bytes)
    assert 0.52e9 < two_bit < 0.525e9  # 2.08 B weights at 2 bits
    assert abs(base3 / 1e9 - PAPER_2B4T_NON_EMBEDDING_GB) < 0.02  # 1.6 bits: the paper's 0.4 GB


def test_cli_prints_sizes_beside_the_2b4t_yardstick(final, tmp_path, capsys):
    export_cli([str(final), "--out", str(tmp_path), "--formats", "own-1.6"])
    printed = capsys.readouterr().out
    assert "own-1.6" in printed and "bits/weight" in printed and "non-embedding" in printed
    assert "2B4T" in printed and f"{PAPER_2B4T_NON_EMBEDDING_GB} GB" in printed


# --- any training checkpoint -----------------------------------------------------------------

def test_step_checkpoint_exports_with_its_stages_config(final, tokenizer, tmp_path, monkeypatch):
    run = tmp_path / "run" / "pretrain"
    shutil.copytree(final, run / "final")
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    model = tiny_model(tokenizer, seed=7)  # not the final weights: the step's must be the ones exported
    save_model(model, str(step / "model.safetensors"))
    write_manifest(step)
    export(step, tmp_path / "out", "own")
    packed = load_file(tmp_path / "out" / "own" / "model.safetensors")
    codes, _ = ternarize(model.model.layers[1].mlp.down_proj.weight.detach())
    assert torch.equal(unpack_ternary(packed["model.layers.1.mlp.down_proj.qweight"], 512), codes)


def test_step_checkpoint_without_its_stages_config_is_named(final, tmp_path):
    step = tmp_path / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    shutil.copy(final / "model.safetensors", step)
    with pytest.raises(CheckpointError, match=r"step_1.*final/config.json"):
        export(step, tmp_path / "out", "own")


# --- bad input -------------------------------------------------------------------------------

def test_unknown_format_is_named_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match=r"onnx.*gguf-tq1"):
        export(tmp_path / "missing", tmp_path / "out", "own,onnx")
    with pytest.raises(SystemExit, match="onnx"):
        export_cli([str(tmp_path), "--out", str(tmp_path / "out"), "--formats", "onnx"])


def test_missing_tokenizer_is_named(final, tmp_path):
    ckpt = shutil.copytree(final, tmp_path / "final", ignore=shutil.ignore_patterns("tokenizer*", "manifest.json"))
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"no tokenizer.*--tokenizer"):
        export(ckpt, tmp_path / "out", "own")
    assert not (tmp_path / "out" / "own").exists()


def test_full_precision_checkpoint_is_not_ternarized(final, tmp_path):
    ckpt = shutil.copytree(final, tmp_path / "final")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "quantize": False}))
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"config.json.*quantize=false"):
        export(ckpt, tmp_path / "out", "own")


def test_corrupt_training_checkpoint_is_named(final, tmp_path):
    ckpt = shutil.copytree(final, tmp_path / "final")
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*corrupt"):
        export(ckpt, tmp_path / "out", "own")


def test_shapes_that_do_not_divide_the_packing_block_are_named_before_writing(tokenizer, tmp_path):
    final = save_stage(tokenizer, tmp_path / "pretrain", hidden_size=128, intermediate_size=130)
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight.*130.*multiple of 4"):
        export(final, tmp_path / "out", "own,hf")
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*in_features=128.*256"):
        export(final, tmp_path / "out", "own,gguf-tq1")
    assert not (tmp_path / "out").exists()  # every check runs before the first format is written
    export(final, tmp_path / "out", "own")  # our own layout pads: any shape
    assert verify_manifest(tmp_path / "out" / "own") is None


def test_hf_check_names_a_row_count_not_divisible_by_4(ckpt):
    six_rows = TernaryWeight("model.layers.0.self_attn.k_proj.weight", torch.zeros(6, 8, dtype=torch.int8),
                             torch.tensor(1.0))
    with pytest.raises(CheckpointError, match=r"k_proj.weight has 6 output rows"):
        hf_format.check(replace(ckpt, ternary=[six_rows]))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_export_is_detected_on_load(out, fmt, tmp_path):
    copy = copy_export(out, fmt, tmp_path)
    weights = next(p for p in copy.iterdir() if p.name.startswith("model."))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    load = {"own": load_packed_model, "own-1.6": load_packed_model, "hf": verify_manifest,
            "gguf-tq2": gguf_format.read_ternary, "gguf-tq1": gguf_format.read_ternary}[fmt]
    with pytest.raises(CheckpointError, match=rf"{weights.name} is corrupt"):
        load(copy)


@pytest.mark.parametrize("fmt, bad_byte", [("own", 0xFF), ("own-1.6", 243)])
def test_out_of_range_codes_in_own_format_are_named(out, fmt, bad_byte, tmp_path):
    copy = copy_export(out, fmt, tmp_path)
    path = copy / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.v_proj.qweight"][3, 5] = bad_byte
    save_file(tensors, str(path), metadata=metadata)
    write_manifest(copy)  # checksums pass: the code check must catch it
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.1.self_attn.v_proj.qweight.*again"):
        load_packed_model(copy)


def test_malformed_gguf_tensor_is_named(out, tmp_path):
    copy = copy_export(out, "gguf-tq2", tmp_path)
    path = copy / "model.gguf"
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    with open(path, "r+b") as f:
        f.seek(tensor.data_offset)
        f.write(b"\xff")  # four 2-bit codes of 3: the value 2 * scale
    write_manifest(copy)
    with pytest.raises(CheckpointError, match=r"model.gguf: tensor blk.0.ffn_up.weight.*not -1, 0 or 1"):
        gguf_format.read_ternary(copy)


def test_a_failed_export_leaves_nothing_half_written(final, tmp_path, monkeypatch):
    def broken(w, qtype):
        raise OSError("disk went away")

    monkeypatch.setattr(gguf_format, "quantize_exact", broken)
    with pytest.raises(OSError, match="disk went away"):
        export(final, tmp_path, "own,gguf-tq1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own"]  # complete, the failed one absent
    verify_manifest(tmp_path / "own")


def test_an_export_is_not_taken_for_a_training_checkpoint(out, tmp_path):
    with pytest.raises(CheckpointError, match=r"already a packed export"):
        export(out / "own", tmp_path, "own")


def test_gguf_pre_tokenizer_is_named_for_llama_cpp_or_refused():
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_format.LLAMA3_REGEX}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert gguf_format.pre_tokenizer_name(llama3) == "llama-bpe"
    assert gguf_format.pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    with pytest.raises(CheckpointError, match="unknown pre-tokenizer.*own or hf"):
        gguf_format.pre_tokenizer_name({"type": "Whitespace"})


def test_gguf_pads_a_vocabulary_larger_than_the_tokenizer(tokenizer):
    writer = gguf.GGUFWriter(None, "bitnet")
    gguf_format.add_tokenizer(writer, tokenizer, len(tokenizer) + 2)
    kv = writer.kv_data[0]
    assert kv["tokenizer.ggml.tokens"].value[-3:] == [tokenizer.convert_ids_to_tokens(len(tokenizer) - 1),
                                                      f"[PAD{len(tokenizer)}]", f"[PAD{len(tokenizer) + 1}]"]
    assert kv["tokenizer.ggml.token_type"].value[-1] == gguf.TokenType.UNUSED


def test_gguf_export_checks_the_quantizer_gives_back_codes_times_fp16_scale(ckpt, monkeypatch):
    quantize = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", lambda data, qtype: quantize(data * 0.9, qtype))
    with pytest.raises(CheckpointError, match=r"q_proj.weight: gguf's TQ1_0 quantizer did not give back"):
        gguf_format.quantize_exact(ckpt.ternary[0], gguf.GGMLQuantizationType.TQ1_0)


def test_training_refuses_to_start_from_a_packed_export(out):
    with pytest.raises(ValueError, match="packed"):
        load_checkpoint_model(out / "own", quantize=True)
