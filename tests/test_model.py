import pytest
import torch
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM

from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.quant import BitLinear

ARCH = dict(
    vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    bos_token_id=0, eos_token_id=1,
)


def tiny(quantize=True, tie=True, **kw):
    torch.manual_seed(0)
    return BitNetTrainForCausalLM(BitNetTrainConfig(**ARCH, tie_word_embeddings=tie, quantize=quantize, **kw))


def test_forward_backward_shapes():
    model = tiny()
    ids = torch.randint(0, 96, (3, 17))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 17, 96)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_every_block_projection_is_bitlinear_and_embeddings_are_not():
    model = tiny()
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.lm_head, BitLinear)
    assert all(b is None for m in model.modules() if isinstance(m, torch.nn.Linear) for b in [m.bias])


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_names_match_transformers_bitnet_and_load_both_ways(tie):
    ours = tiny(tie=tie)
    torch.manual_seed(1)
    theirs = BitNetForCausalLM(BitNetConfig(**ARCH, tie_word_embeddings=tie))
    a, b = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ours.load_state_dict(b)
    assert all(torch.equal(ours.state_dict()[k], b[k]) for k in b)
    theirs.load_state_dict(tiny(tie=tie).state_dict())
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie


def test_full_precision_twin_matches_transformers_llama_style_forward():
    """With quantize=false the graph must equal transformers' BitNet in full precision
    (same RoPE, GQA, ReLU², sub-norms): any architecture slip shows up as a large error."""
    theirs = BitNetForCausalLM(BitNetConfig(**ARCH, tie_word_embeddings=True)).eval()
    ours = tiny(quantize=False).eval()
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 96, (2, 20))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_quantize_switch_changes_the_forward_only():
    q, fp = tiny(quantize=True), tiny(quantize=False)
    fp.load_state_dict(q.state_dict())
    ids = torch.randint(0, 96, (1, 9))
    assert not torch.allclose(q(ids).logits, fp(ids).logits)


def test_kv_cache_generation_equals_full_recompute():
    model = tiny().eval()
    prompt = torch.randint(0, 96, (1, 6))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=1)
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_is_read_under_its_new_and_old_name(name):
    """transformers renamed the KV cache argument; a decode step must see the prompt either way."""
    from transformers.cache_utils import DynamicCache

    model = tiny().eval()
    ids = torch.randint(0, 96, (1, 7))
    cache = DynamicCache(config=model.config)
    model(ids[:, :-1], **{name: cache}, use_cache=True)
    step = model(ids[:, -1:], **{name: cache}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, model(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_unknown_forward_arguments_fail_loudly():
    with pytest.raises(TypeError, match="kv_cache"):
        tiny()(torch.randint(0, 96, (1, 4)), kv_cache=None)


def test_padded_batch_matches_unpadded_rows():
    model = tiny().eval()
    a, b = torch.randint(2, 96, (1, 8)), torch.randint(2, 96, (1, 5))
    batch = torch.cat([a, torch.cat([b, torch.ones(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    logits = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[1, :5], model(b).logits[0], rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 96, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        if ckpt:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(*grads))


def test_registered_with_auto_classes(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, BitNetTrainForCausalLM) and loaded.config.quantize
    ids = torch.randint(0, 96, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_our_checkpoint_loads_in_transformers_bitnet(tmp_path):
    model = tiny(quantize=False).eval()
    model.save_pretrained(tmp_path)
    theirs = BitNetForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 7))
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_choices_give_llamas_parameter_names_and_its_full_precision_forward():
    """silu, no sub-norms: transformers' Llama, every projection a BitLinear (conversion's student)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(**ARCH, tie_word_embeddings=True, rms_norm_eps=1e-5)).eval()
    ours = tiny(quantize=False, hidden_act="silu", sub_norms=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 96, (2, 20))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_qkv_bias_gives_qwen2s_biases_on_q_k_v_only():
    names = {n for n, _ in tiny(qkv_bias=True, sub_norms=False).named_parameters() if n.endswith(".bias")}
    assert names == {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"}


def test_an_unknown_activation_is_named():
    with pytest.raises(Exception, match="hidden_act='gelu'"):
        tiny(hidden_act="gelu")
