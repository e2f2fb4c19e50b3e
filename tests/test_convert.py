"""Conversion of a pretrained Llama-family model to ternary (stages/convert.py, teacher.py).

Teachers are tiny random LlamaForCausalLM / Qwen2ForCausalLM models made here, saved with the
built-in tokenizer, so nothing is downloaded."""
import json
import re
import shutil

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bitnet_train import cli
from bitnet_train.checkpoint import CheckpointError, save_final
from bitnet_train.config import compose_config
from bitnet_train.data.builtin_text import builtin_documents
from bitnet_train.data.tokenizer import builtin_tokenizer
from bitnet_train.engine import Engine, generate, read_documents, token_blocks
from bitnet_train.export import export, gguf_format
from bitnet_train.export.own_format import load_packed_model
from bitnet_train.losses import attention_relation_kl_sum, distillation_kl_sum
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.model_factory import load_checkpoint_model
from bitnet_train.pipeline import run_pipeline
from bitnet_train.quant import (
    BitLinear, quantize_activation, quantize_int8, quantize_weight, set_quant_strength, ternarize, warmup_strength,
)
from bitnet_train.teacher import init_from_teacher, load_teacher, locate, student_model_config

VOCAB = 4096  # the built-in tokenizer's
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=1,
)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def random_teacher(family: str, seed: int = 0, **shape):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SHAPE, **shape})).eval()
    with torch.no_grad():  # transformers initialises biases to 0; random ones test that they are carried
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def student_for(teacher, sub_norms: bool = False) -> BitNetTrainForCausalLM:
    arch = student_model_config(teacher.config)
    rope = {"rope_type": "default", "rope_theta": arch.pop("rope_theta")}
    config = BitNetTrainConfig(
        **arch, vocab_size=VOCAB, max_position_embeddings=128, rope_parameters=rope, sub_norms=sub_norms,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    student = BitNetTrainForCausalLM(config).eval()
    init_from_teacher(student, teacher)
    return student


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    random_teacher("llama").save_pretrained(path)
    builtin_tokenizer(VOCAB).save_pretrained(path)
    return path


def ids(n=2, t=24, seed=1):
    return torch.randint(2, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family, sub_norms", [("llama", False), ("qwen2", False), ("llama", True)])
def test_at_lambda_0_the_student_computes_the_teacher(family, sub_norms):
    """With SubLN too: the norms the teacher lacks are blended in with λ (stages/convert.py), so at
    λ = 0 they pass their input through."""
    teacher = random_teacher(family)
    student = student_for(teacher, sub_norms)
    inserted = init_from_teacher(student, teacher)
    assert len(inserted) == (2 * SHAPE["num_hidden_layers"] if sub_norms else 0)
    set_quant_strength(student, 0.0)
    for norm in inserted:
        norm.strength = 0.0
    with torch.no_grad():
        torch.testing.assert_close(student(ids()).logits, teacher(ids()).logits, rtol=1e-4, atol=1e-4)


class QuantizedLinear(torch.nn.Module):
    """The ternary forward written out: F.linear(int8 activations, ternary weights) + bias."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        w = quantize_weight(self.linear.weight)
        return torch.nn.functional.linear(quantize_activation(x), w, self.linear.bias)


def quantized_teacher(teacher):
    """The teacher with every block projection replaced by the written-out ternary forward."""
    for layer in teacher.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, QuantizedLinear(child))
    return teacher


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_at_lambda_1_the_student_is_the_ternary_forward_of_the_teacher(family):
    """x + 1·(q(x) − x) can differ from q(x) by an ulp, which flips a few int8 roundings further on
    (REFERENCE.md 6): compare with a tolerance and the argmax. A wrong activation or a lost bias is
    off by far more."""
    student = student_for(random_teacher(family))
    set_quant_strength(student, 1.0)
    reference = quantized_teacher(random_teacher(family))
    with torch.no_grad():
        ours, theirs = student(ids()).logits, reference(ids()).logits
    assert (ours - theirs).abs().max() < 1e-2 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


def test_lambda_1_is_todays_bitlinear_forward_bit_for_bit():
    torch.manual_seed(0)
    layer, x = BitLinear(32, 16), torch.randn(3, 32)
    expected = torch.nn.functional.linear(
        x + (quantize_activation(x) - x), layer.weight + (quantize_weight(layer.weight) - layer.weight)
    )
    assert torch.equal(layer(x), expected)
    layer.strength = 0.0
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_warmup_strength_rises_linearly_to_1_and_stays():
    assert [warmup_strength(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert warmup_strength(0, 0) == 1.0
    with pytest.raises(ValueError, match="outside"):
        set_quant_strength(torch.nn.Linear(2, 2), 1.5)


def test_distillation_losses_are_zero_for_identical_models():
    logits = torch.randn(2, 7, 50)
    assert float(distillation_kl_sum(logits, logits.clone(), temperature=2.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(distillation_kl_sum(logits, torch.randn(2, 7, 50), 2.0)) > 0.1
    qkv = [torch.randn(2, 7, 16) for _ in range(3)]
    assert float(attention_relation_kl_sum(qkv, [t.clone() for t in qkv], heads=2)) == pytest.approx(0.0, abs=1e-5)
    assert float(attention_relation_kl_sum(qkv, [torch.randn(2, 7, 16) for _ in range(3)], heads=2)) > 0.1


def test_subln_student_has_unit_sub_norms_and_the_teachers_other_weights():
    teacher = random_teacher("llama")
    student = student_for(teacher, sub_norms=True)
    norms = [p for n, p in student.named_parameters() if "sub_norm" in n]
    assert len(norms) == 2 * SHAPE["num_hidden_layers"] and all(bool((p == 1).all()) for p in norms)
    for name, p in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], p), name


def test_a_student_of_another_shape_names_the_overrides():
    teacher = random_teacher("llama")
    config = BitNetTrainConfig(**{**SHAPE, "hidden_size": 32}, hidden_act="silu", sub_norms=False)
    with pytest.raises(ValueError, match=r"model.hidden_size=64"):
        init_from_teacher(BitNetTrainForCausalLM(config), teacher)


def test_teacher_specs_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_package_xyz"):
        locate("pkg:no_such_package_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        locate(str(tmp_path / "m.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        locate(str(tmp_path))


def test_a_packaged_teacher_is_found_without_importing_its_package(teacher_dir, tmp_path, monkeypatch):
    package = tmp_path / "ships_a_teacher"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the plugin host is not installed')\n")
    shutil.copytree(teacher_dir, package / "model")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert locate("pkg:ships_a_teacher/model") == (package / "model", None)
    assert type(load_teacher("pkg:ships_a_teacher/model")) is LlamaForCausalLM


def test_an_unsupported_teacher_family_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' model"):
        load_teacher(str(tmp_path))


def convert_overrides(teacher_dir, tmp_path, name, *extra):
    return [
        "logging=off", "logging.progress_bar=false", "logging.plot=false",
        "~stages.pretrain", "+stage@stages.convert=convert", "pipeline=[convert]",
        f"tokenizer.name={teacher_dir}", f"stages.convert.teacher={teacher_dir}",
        "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=128",
        "model.hidden_act=silu", "model.sub_norms=false", "model.rope_theta=10000.0",
        "stages.convert.max_steps=6", "stages.convert.quant_warmup_steps=3", "stages.convert.micro_batch_size=4",
        "stages.convert.data.seq_len=32", "stages.convert.eval_every=3", "stages.convert.eval_batches=2",
        "stages.convert.save_every=3", "stages.convert.schedule.warmup_steps=1",
        "stages.convert.schedule.lr_peak=1e-3", "stages.convert.attn_weight=1.0",
        f"output_dir={tmp_path / name}", *extra,
    ]


def metrics(stage_dir, key="train/loss"):
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.slow
def test_convert_stage_trains_and_resumes_mid_warmup_exactly(teacher_dir, tmp_path):
    args = convert_overrides(teacher_dir, tmp_path, "run", "stages.convert.quant_warmup_steps=4",
                             "stages.convert.save_every=2", "stages.convert.keep_checkpoints=5", "logging.log_every=1")
    whole = run_pipeline(compose_config([*args, f"output_dir={tmp_path / 'whole'}"]))["convert"].parent
    interrupted = run_pipeline(compose_config(args))["convert"].parent
    # The run died after step 2's checkpoint, at λ = 0.5: the teacher is reloaded, λ follows the step.
    for p in ("final", "checkpoints/step_00000004", "checkpoints/step_00000006"):
        shutil.rmtree(interrupted / p)
    resumed = run_pipeline(compose_config(args))["convert"].parent
    assert metrics(resumed) == metrics(whole)  # bit-for-bit, every step
    assert metrics(resumed, "val/ppl") == metrics(whole, "val/ppl")
    assert {"train/nll", "train/kd", "train/attn"} <= set(json.loads((whole / "metrics.jsonl").read_text().splitlines()[0]))
    model = load_checkpoint_model(whole / "final", quantize=True)
    assert model.config.hidden_act == "silu" and not model.config.sub_norms
    assert all(m.strength == 1.0 for m in model.modules() if isinstance(m, BitLinear))


def test_a_warmup_as_long_as_the_stage_is_refused(teacher_dir, tmp_path):
    cfg = compose_config(convert_overrides(teacher_dir, tmp_path, "r", "stages.convert.quant_warmup_steps=6"))
    with pytest.raises(ValueError, match="quant_warmup_steps=6"):
        run_pipeline(cfg)


@pytest.mark.slow
def test_sft_and_dpo_run_on_the_converted_model(teacher_dir, tmp_path):
    overrides = convert_overrides(teacher_dir, tmp_path, "then_sft", "pipeline=[convert,sft,dpo]",
                                  "stages.sft.max_steps=2", "stages.sft.micro_batch_size=4",
                                  "stages.sft.data.seq_len=96", "stages.sft.eval_batches=1",
                                  "stages.dpo.max_steps=2", "stages.dpo.micro_batch_size=2",
                                  "stages.dpo.data.seq_len=96", "stages.dpo.eval_batches=1")
    outputs = run_pipeline(compose_config(overrides))
    for stage in ("sft", "dpo"):
        model = load_checkpoint_model(outputs[stage], quantize=True)
        assert model.config.hidden_act == "silu" and not model.config.sub_norms


# ---------------------------------------------------------------- exports of converted models
# Hidden and FFN widths are multiples of 256, GGUF's TQ block.
EXPORT_SHAPE = dict(hidden_size=256, intermediate_size=512)


def converted_final(family, tmp_path, sub_norms=False, **shape):
    """A converted student's final/ directory, as the convert stage leaves it."""
    student = student_for(random_teacher(family, **{**EXPORT_SHAPE, **shape}), sub_norms=sub_norms)
    save_final(student, builtin_tokenizer(VOCAB), tmp_path / family / "final")
    return tmp_path / family / "final", student


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_export_is_the_teachers_class_in_stock_transformers(family, tmp_path):
    final, student = converted_final(family, tmp_path)
    export(final, tmp_path / "out", "hf")
    config = json.loads((tmp_path / "out/hf/config.json").read_text())
    assert config["model_type"] == family and config["quantization_config"]["quant_method"] == "bitnet"
    with torch._dynamo.config.patch(disable=True):  # transformers' BitNet unpacking is torch.compile'd
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out/hf")
        assert type(hf) is FAMILIES[family][1]
        with torch.no_grad():
            theirs, ours = hf(ids()).logits, student(ids()).logits
    # AutoBitLinear multiplies by 1/s after the matmul: an ulp apart, a few int8 roundings flip.
    assert (theirs - ours).abs().max() < 1e-2 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


def test_subln_student_exports_as_bitnet_with_silu(tmp_path):
    final, student = converted_final("llama", tmp_path, sub_norms=True)
    export(final, tmp_path / "out", "hf")
    with torch._dynamo.config.patch(disable=True):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out/hf")
        assert type(hf).__name__ == "BitNetForCausalLM" and hf.config.hidden_act == "silu"
        with torch.no_grad():
            theirs, ours = hf(ids()).logits, student(ids()).logits
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_export_has_the_teachers_llama_cpp_architecture_and_tq2_tensors(family, tmp_path):
    final, student = converted_final(family, tmp_path)
    export(final, tmp_path / "out", "gguf-tq2")
    reader = gguf.GGUFReader(tmp_path / "out/gguf-tq2/model.gguf")
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == family
    codes = gguf_format.read_ternary(tmp_path / "out/gguf-tq2")
    q = ternarize(student.model.layers[0].self_attn.q_proj.weight.detach())[0].to(torch.int8)
    # llama.cpp's llama graph rotates interleaved pairs: its q/k rows are reordered; qwen2's are not.
    expected = gguf_format.rope_rows(q, SHAPE["num_attention_heads"]) if family == "llama" else q
    assert torch.equal(codes["blk.0.attn_q.weight"][0], expected)
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert not any("sub_norm" in n for n in names)


def test_gguf_names_the_tensor_tq2_blocks_do_not_divide(tmp_path):
    final, _ = converted_final("llama", tmp_path, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=r"q_proj.weight has in_features=576.*blocks of 256"):
        export(final, tmp_path / "out", "gguf-tq2")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- our own format and engine
# One engine for every architecture choice of the training model. A larger init (std 0.2) spreads the
# logits (std ~3), so a wrong graph cannot hide in near-uniform predictions.
ENGINE_CASES = {
    "llama": ("llama", False, {}),
    "llama-untied": ("llama", False, {"tie_word_embeddings": False}),
    "qwen2": ("qwen2", False, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "llama-subln": ("llama", True, {}),
}


@pytest.fixture(scope="module", params=list(ENGINE_CASES))
def own_export(request, tmp_path_factory):
    """(export directory with own/ and own-1.6/, the training model) of a converted student."""
    family, sub_norms, shape = ENGINE_CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    final, student = converted_final(family, tmp, sub_norms=sub_norms, initializer_range=0.2, **shape)
    export(final, tmp / "out", "own,own-1.6")
    return tmp / "out", student


def agrees_with_training(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Median and largest difference (relative to the largest logit) and argmax agreement: an ulp
    apart, an int8 activation rounding can tip and move single logits by about one int8 step
    (REFERENCE.md 6). Measured on the four cases: median <= 1.2e-7, max <= 2.3e-2, argmax >= 0.986.
    A lost q/k/v bias, ReLU² for SiLU or a dropped SubLN: median >= 6e-2, argmax <= 0.36."""
    diff = (ours - ref).abs() / ref.abs().max()
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    return float(diff.median()) < 1e-6 and float(diff.max()) < 5e-2 and float(agreement) >= 0.95


def test_the_engine_runs_a_converted_model_as_the_training_model_does(own_export):
    out, student = own_export
    engine = Engine.from_export(out / "own", device="cpu")
    x = ids(3, 48)
    with torch.no_grad():
        ref = student(x).logits
        assert agrees_with_training(load_packed_model(out / "own")(x).logits, ref)  # the pure-torch reader
    compiled = engine.forward(x)
    assert agrees_with_training(compiled, ref)
    engine.native = None  # the torch layers: the GPU path and the fallback
    assert agrees_with_training(engine.forward(x), ref)
    assert torch.equal(Engine.from_export(out / "own-1.6", device="cpu").forward(x), compiled)


def test_the_engine_decodes_a_converted_model_greedily_as_the_training_model(own_export):
    out, student = own_export
    engine = Engine.from_export(out / "own", device="cpu")
    prompt = ids(1, 12)
    with torch.no_grad():
        ref = student.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)[0, 12:]
    assert generate(engine, prompt[0].tolist(), 16) == ref.tolist()
    cache, full = engine.new_cache(1, 28), engine.forward(ids(1, 28))
    steps = [engine.forward(ids(1, 28)[:, :20], cache)] + [engine.forward(ids(1, 28)[:, t:t + 1], cache)
                                                          for t in range(20, 28)]
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5 * float(full.abs().max()))


def test_qkv_biases_are_added_to_the_exact_integer_product(tmp_path):
    """Qwen2's q/k/v: dot / (s_w * s_a) + bias, bit for bit: the rescale first, as BitLinear's F.linear."""
    final, student = converted_final("qwen2", tmp_path)
    export(final, tmp_path / "out", "own")
    engine = Engine.from_export(tmp_path / "out/own", device="cpu")
    x = torch.randn(5, EXPORT_SHAPE["hidden_size"], generator=torch.Generator().manual_seed(3))
    a, s_a = quantize_int8(x)
    attn = student.model.layers[1].self_attn
    for out, module in zip(engine.linear(x, engine.weights.layers[1].qkv), (attn.q_proj, attn.k_proj, attn.v_proj)):
        codes, s_w = ternarize(module.weight.detach())
        dot = a.to(torch.int64) @ codes.to(torch.int64).T
        assert torch.equal(out, dot.float() / (s_w * s_a) + module.bias.detach())


def test_eval_prints_the_training_models_perplexity_of_a_converted_model(own_export, tmp_path, monkeypatch, capsys):
    out, student = own_export
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(builtin_documents()[1:4]))
    monkeypatch.setattr("sys.argv", ["bitnet-train", "eval", str(out / "own"), "--ppl", str(text),
                                     "--seq-len", "64", "--device", "cpu"])
    cli.main()
    printed = re.search(r"perplexity [\d.]+ \(loss ([\d.]+) over (\d+) tokens", capsys.readouterr().out)
    blocks = token_blocks(builtin_tokenizer(VOCAB), read_documents(text), 64)
    with torch.no_grad():
        ref = student(blocks, labels=blocks).loss
    assert int(printed[2]) == blocks.numel() - len(blocks)
    # As tests/test_engine.py's perplexity test: flipped roundings move single logits, not the mean loss.
    assert float(printed[1]) == pytest.approx(float(ref), rel=1e-4)


def nll_per_token(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:]))


@pytest.mark.slow  # ~6 s each: an optional cross-runtime check, kept out of the fast tier
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_runs_the_converted_gguf_with_our_perplexity(family, tmp_path):
    """Stock llama.cpp, through llama-cpp-python, on a converted model's TQ2_0 GGUF.

    Tolerance: llama.cpp multiplies TQ2_0 weights by activations it quantizes itself (Q8_K: int8 per
    256-value block, not our per-token absmax) and reads each weight scale as fp16 (2^-11 relative):
    the same ternary model on a slightly different int8 grid. So its log-perplexity and its logits
    must stay closer to ours than our own model without activation quantization is (the whole size
    of that choice), and the log-perplexity within 2%. Measured: NLL gap 0.008 (llama) / 0.011
    (qwen2) against brackets 0.021 / 0.018; max logit gap 0.81 against 1.46 / 0.99; argmax agreement
    0.89 / 0.95 (ours without activation quantization: 0.93 / 0.91). A larger init spreads the
    logits (std ~3), so a wrong graph cannot hide in near-uniform predictions: with the llama q/k
    rows left in rotate-half order the NLL gap is 0.21, the max logit gap 21 and argmax agreement 0.01.
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'bitnet-train[convert]'")
    final, student = converted_final(family, tmp_path, initializer_range=0.2)
    export(final, tmp_path / "out", "gguf-tq2")
    tokens = torch.tensor(builtin_tokenizer(VOCAB)(builtin_documents()[1])["input_ids"][:96])
    llm = llama_cpp.Llama(str(tmp_path / "out/gguf-tq2/model.gguf"), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(tokens.tolist())
    theirs = torch.tensor(llm.scores[: len(tokens)])
    with torch.no_grad():
        ours = student(tokens[None]).logits[0]
        set_quant_strength(student, 1.0)
        for m in student.modules():  # weights ternary, activations left in float: the bracket
            if isinstance(m, BitLinear):
                m.forward = lambda x, m=m: torch.nn.functional.linear(x, quantize_weight(m.weight), m.bias)
        float_activations = student(tokens[None]).logits[0]
    gap = abs(nll_per_token(theirs, tokens) - nll_per_token(ours, tokens))
    bracket = abs(nll_per_token(float_activations, tokens) - nll_per_token(ours, tokens))
    assert gap < bracket and gap < 0.02 * nll_per_token(ours, tokens)
    assert (theirs - ours).abs().max() < (float_activations - ours).abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.8
