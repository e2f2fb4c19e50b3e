"""The chunked linear + cross-entropy (kernels/chunked_ce.py) equals lm_head + F.cross_entropy."""
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from torch.utils._python_dispatch import TorchDispatchMode

from bitnet_train import losses
from bitnet_train import model as model_module
from bitnet_train.config import ConfigError, compose_config
from bitnet_train.kernels import chunked_ce
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.pipeline import run_pipeline, validate_run

ROOT = Path(__file__).resolve().parent.parent


def reference_and_chunked(dtype, autocast: bool, chunk_tokens: int):
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(3, 10, 16, generator=g).to(dtype)
    w0 = torch.randn(50, 16, generator=g) * 0.3
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, 4] = labels[2, 7] = losses.IGNORE
    out = []
    for chunked in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                loss, n = chunked_ce.next_token_loss_sum(h, w, labels, chunk_tokens)
            else:
                loss, n = losses.next_token_loss_sum(F.linear(h, w), labels)
        (loss * 0.5).backward()  # an upstream gradient other than 1
        out.append((loss, n, h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk_tokens", [1, 7, 27, 1000])  # 27 tokens: uneven chunks, one chunk
def test_float32_loss_and_gradients_match(chunk_tokens):
    (loss, n, gh, gw), (ref_loss, ref_n, ref_gh, ref_gw) = reference_and_chunked(torch.float32, False, chunk_tokens)
    assert n == ref_n == 25
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_ignored_tokens_get_no_gradient():
    (_, _, gh, _), _ = reference_and_chunked(torch.float32, False, 7)
    # h[b, t] predicts labels[b, t + 1]: labels[0, 4] and [2, 7] are ignored; the last position predicts nothing
    for b, t in [(0, 3), (2, 6), (0, 9), (1, 9), (2, 9)]:
        assert torch.count_nonzero(gh[b, t]) == 0
    assert torch.count_nonzero(gh[1, 3]) > 0


def test_autocast_matches_the_bf16_head():
    (loss, _, gh, gw), (ref_loss, _, ref_gh, ref_gw) = reference_and_chunked(torch.float32, True, 7)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)  # same bf16 logits, float32 softmax
    # the gradient of the logits is rounded to bf16 (as autocast's backward does), then multiplied
    torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-3)


# --- The model's training loss (model.loss_chunk_tokens): the same loss and gradients, no full logits ---

ARCH = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
IDS = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
SFT_LABELS = IDS.clone()
SFT_LABELS[:, :15] = losses.IGNORE  # the prompts
SFT_LABELS[1, 30:] = losses.IGNORE  # padding
# float32: the chunks sum the same products in another order, so gradients move by a few float32
# roundings (measured: at most 6.4e-7 of a parameter's largest gradient entry). A real error is far
# larger: one of these ~100 tokens lost or mislabelled moves the loss and gradients by ~1%.
FP32 = dict(loss_rtol=1e-6, grad_rtol=1e-5)
# bf16 autocast: the gradient of the logits is rounded to bf16 at another point than autocast's
# backward rounds it (measured: 3.9e-3 of the largest entry, half a bf16 epsilon).
BF16 = dict(loss_rtol=1e-6, grad_rtol=2e-2)


def tiny_model(chunk_tokens: int, tie: bool = True) -> BitNetTrainForCausalLM:
    torch.manual_seed(0)
    model = BitNetTrainForCausalLM(BitNetTrainConfig(**ARCH, tie_word_embeddings=tie)).train()
    model.loss_chunk_tokens = chunk_tokens
    return model


def model_loss_and_grads(chunk_tokens: int, labels: torch.Tensor, tie: bool = True, autocast: bool = False,
                         checkpointing: bool = False):
    model = tiny_model(chunk_tokens, tie)
    if checkpointing:
        model.activation_checkpointing_enable()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(IDS, labels=labels, loss_reduction="sum")
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


def assert_same_loss_and_grads(chunked, full, loss_rtol: float, grad_rtol: float) -> None:
    (out, grads), (ref_out, ref_grads) = chunked, full
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=loss_rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        # relative to the parameter's largest entry: entries near zero carry only rounding
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=grad_rtol * float(ref.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("labels", [IDS, SFT_LABELS], ids=["pretrain", "sft"])
def test_the_chunked_model_loss_equals_the_full_logits_loss(labels, tie):
    chunked = model_loss_and_grads(7, labels, tie)
    assert chunked[0].logits is None
    assert_same_loss_and_grads(chunked, model_loss_and_grads(0, labels, tie), **FP32)


@pytest.mark.parametrize("labels", [IDS, SFT_LABELS], ids=["pretrain", "sft"])
def test_the_chunked_model_loss_under_bf16_autocast(labels):
    assert_same_loss_and_grads(model_loss_and_grads(7, labels, autocast=True),
                               model_loss_and_grads(0, labels, autocast=True), **BF16)


def test_the_chunked_model_loss_with_activation_checkpointing():
    assert_same_loss_and_grads(model_loss_and_grads(7, SFT_LABELS, checkpointing=True),
                               model_loss_and_grads(0, SFT_LABELS), **FP32)


def test_the_mean_loss_and_the_logits_ignore_the_switch():
    """Only training's summed loss is chunked; transformers' mean loss keeps its logits."""
    model = tiny_model(7)
    out = model(IDS, labels=IDS)
    assert out.logits.shape == (*IDS.shape, 96)
    model.loss_chunk_tokens = 0
    assert torch.equal(model(IDS, labels=IDS).loss, out.loss)


def test_validation_under_no_grad_gives_the_same_loss():
    with torch.no_grad():
        chunked, full = (tiny_model(c)(IDS, labels=SFT_LABELS, loss_reduction="sum").loss for c in (7, 0))
    torch.testing.assert_close(chunked, full, rtol=FP32["loss_rtol"], atol=0)


class LargestVocabRows(TorchDispatchMode):
    """The most rows of any tensor an op makes whose rows are vocabulary-wide (logits and their kin)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("chunk_tokens", [0, 7])
def test_the_chunked_loss_never_holds_the_full_logits(chunk_tokens):
    """Forward and backward; the full path (0) is the control: it holds a logit row per token."""
    model = tiny_model(chunk_tokens)
    with LargestVocabRows(ARCH["vocab_size"]) as seen:
        model(IDS, labels=IDS, loss_reduction="sum").loss.backward()
    if chunk_tokens == 0:
        assert seen.rows == IDS.numel()
    else:  # a chunk's logits, or the head's weight transposed (hidden_size rows)
        assert seen.rows <= max(chunk_tokens, ARCH["hidden_size"]) < IDS.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunks_logits_are_freed_before_the_next_chunks_are_made(monkeypatch, dtype):
    """Peak memory is one chunk's logits, not two: when a chunk's log-softmax is computed, no
    earlier chunk's is still alive (weak references to every one made)."""
    made, alive_at_each = [], []
    log_softmax = torch.log_softmax

    def recording(x, dim):
        alive_at_each.append(sum(ref() is not None for ref in made))
        out = log_softmax(x, dim=dim)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(torch, "log_softmax", recording)
    h = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    chunked_ce.linear_cross_entropy_sum(h, w, torch.randint(0, 50, (40,)), chunk_tokens=8).backward()
    assert alive_at_each == [0] * 5


# --- The config switch ---

def test_the_switch_reaches_pretraining_and_sft(tmp_path, tiny_overrides, monkeypatch):
    seen = []  # (chunk_tokens, whether some labels were ignored) of each chunked loss

    def spy(h, weight, labels, chunk_tokens):
        seen.append((chunk_tokens, bool((labels == losses.IGNORE).any())))
        return real(h, weight, labels, chunk_tokens)

    real = model_module.chunked_next_token_loss_sum
    monkeypatch.setattr(model_module, "chunked_next_token_loss_sum", spy)
    run_pipeline(compose_config([
        *tiny_overrides, "pipeline=[pretrain,sft]", "model.loss_chunk_tokens=16", "stages.pretrain.max_steps=1",
        "stages.sft.max_steps=1", "stages.sft.micro_batch_size=4", "stages.sft.data.num_train_examples=8",
        "stages.sft.data.num_eval_examples=4", "stages.sft.eval_batches=1", f"output_dir={tmp_path}"]))
    assert {chunk for chunk, _ in seen} == {16}
    assert {ignored for _, ignored in seen} == {False, True}  # pretraining's labels, then SFT's


def test_a_negative_chunk_is_refused_at_start_up(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"model.loss_chunk_tokens=-1 must be >= 0"):
        validate_run(compose_config([*tiny_overrides, "model.loss_chunk_tokens=-1", f"output_dir={tmp_path}"]))


@pytest.mark.slow
def test_the_chunked_loss_under_ddp_and_fsdp2_on_two_ranks(tmp_path):
    """tests/chunked_ce_worker.py on 2 gloo ranks; the reference is one process on the full logits."""
    import chunked_ce_worker as worker

    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "chunked_ce_worker.py"), str(tmp_path)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ids, labels = worker.batch()
    model = worker.fresh_model(0)
    model(ids, labels=labels, loss_reduction="sum").loss.backward()
    for kind in ("ddp", "fsdp2"):
        grads = load_file(tmp_path / f"{kind}.safetensors")
        assert grads.keys() == {name for name, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=FP32["grad_rtol"] * float(p.grad.abs().max()),
                                       msg=lambda m: f"{kind} {name}: {m}")
