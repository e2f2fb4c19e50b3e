"""The estimate's arithmetic against numbers worked out by hand for BitNet b1.58 2B4T."""
import pytest
import torch

from bitnet_train.estimate import ModelShape, flops_per_token, main, memory_per_gpu, required_throughput
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM

B2B4T = ModelShape(hidden=2560, intermediate=6912, layers=30, heads=20, kv_heads=5, vocab=128256, tied=True)
P = 2_412_820_480  # 128256*2560 + 30 * (2*2560^2 + 2*2560*640 + 3*2560*6912 + 3*2560 + 6912) + 2560
TOKENS = 4 * 4096


def test_parameter_count_of_2b4t_by_hand():
    assert B2B4T.kv_dim == 640
    assert B2B4T.block_params == 16_384_000 + 53_084_160 + 14_592
    assert B2B4T.params == P


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_model_we_train(tied):
    """Built on the meta device (no memory), so the real 2B4T shape costs nothing."""
    config = BitNetTrainConfig(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
                               num_attention_heads=20, num_key_value_heads=5, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = BitNetTrainForCausalLM(config)
    shape = ModelShape(2560, 6912, 30, 20, 5, 128256, tied)
    assert sum(p.numel() for p in model.parameters()) == shape.params  # parameters() counts tied ones once


def test_training_state_per_mode_on_64_ranks():
    ddp = memory_per_gpu(B2B4T, "ddp", 64, TOKENS, checkpointing=True)
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.gathered) == (4 * P, 4 * P, 8 * P, 0)
    zero2 = memory_per_gpu(B2B4T, "deepspeed_zero2", 64, TOKENS, checkpointing=True)
    assert (zero2.weights, zero2.grads, zero2.optimizer) == (4 * P, 150_801_280, 301_602_560)
    for mode in ("deepspeed_zero3", "fsdp_full_shard"):
        full = memory_per_gpu(B2B4T, mode, 64, TOKENS, checkpointing=True)
        assert (full.weights, full.grads, full.optimizer) == (150_801_280, 150_801_280, 301_602_560)
        assert full.gathered == 2 * 69_482_752 * 4  # two blocks' fp32 weights


def test_activations_and_logits_for_4_sequences_of_4096():
    per_token_block = (5 * 2560 + 3 * 640 + 6 * 6912) * 2 + (6 * 2560 + 6912) * 1  # bf16 + int8 codes
    assert per_token_block == 134_656
    ckpt = memory_per_gpu(B2B4T, "ddp", 8, TOKENS, checkpointing=True)
    none = memory_per_gpu(B2B4T, "ddp", 8, TOKENS, checkpointing=False)
    assert ckpt.activations == TOKENS * (30 * 2560 * 2 + 134_656) == 4_722_786_304
    assert none.activations == TOKENS * 30 * 134_656 == 66_186_117_120
    assert ckpt.logits == TOKENS * 128256 * 8 == 16_810_770_432
    assert ckpt.total == 16 * P + ckpt.activations + ckpt.logits


def test_the_chunked_loss_holds_the_head_its_gradient_and_one_chunk():
    head, grad_h = 128256 * 2560 * (2 + 4), TOKENS * 2560 * 4  # bf16 head + fp32 head gradient; fp32 grad of h
    small = memory_per_gpu(B2B4T, "ddp", 8, TOKENS, True, loss_chunk_tokens=1024)
    # a 1024-token chunk: its gradient beside the head-gradient product outweighs its logits
    assert small.logits == head + grad_h + 6 * 1024 * 128256 + 6 * 128256 * 2560 == 4_895_801_344
    whole = memory_per_gpu(B2B4T, "ddp", 8, TOKENS, True, loss_chunk_tokens=10**6)  # one chunk of every token
    assert whole.logits == head + grad_h + 8 * TOKENS * 128256
    assert memory_per_gpu(B2B4T, "ddp", 8, TOKENS, True, loss_chunk_tokens=0).logits == TOKENS * 128256 * 8


def test_tokens_per_second_for_4t_tokens_in_30_days_on_256_gpus():
    need = required_throughput(B2B4T, 4e12, days=30, gpus=256, seq_len=4096)
    assert need.tokens_per_s == pytest.approx(4e12 / 2_592_000)  # 1,543,209.9
    assert need.tokens_per_s_per_gpu == pytest.approx(6028.16, abs=0.01)
    assert flops_per_token(B2B4T, 4096) == 6 * (30 * 69_482_752 + 128256 * 2560) + 6 * 30 * 4096 * 2560
    assert need.flops_per_s_per_gpu == pytest.approx(6028.16 * 16_364_344_320, rel=1e-6)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="unknown launch mode 'zero4'"):
        memory_per_gpu(B2B4T, "zero4", 8, TOKENS, checkpointing=True)


def test_cli_reads_the_2b4t_recipe(capsys):
    main(["--gpus", "256", "--days", "30"])
    out = capsys.readouterr().out
    assert "2.413B parameters" in out and "16384 tokens per GPU" in out
    assert "6,028 tokens/s per GPU" in out
    assert all(mode in out for mode in ("| ddp |", "| deepspeed_zero2 |", "| deepspeed_zero3 |", "| fsdp_full_shard |"))
