"""Conversion: a pretrained Llama-family model becomes a ternary one, trained on pretraining data.

The student has the teacher's architecture with every block projection a BitLinear and starts
from the teacher's weights (teacher.py). Two things keep it close to the teacher while it learns
to live with ternary weights and int8 activations:
  - λ warm-up (Hugging Face's 1.58-bit Llama write-up): every quantizer computes x + λ·(q(x) − x),
    λ = min(step / quant_warmup_steps, 1), so training starts at the teacher's function and reaches
    the ternary forward after quant_warmup_steps; the saved model is always the λ = 1 one. A SubLN
    the teacher lacks (model.sub_norms on a Llama) is blended in the same way, x + λ·(norm(x) − x).
  - distillation from the frozen teacher (BitDistill, arXiv 2510.13998): a KL on the logits at a
    temperature, and optionally a MiniLM-style KL on one layer's Q/K/V self-relations.
Training loss per token: nll_weight·NLL + kd_weight·KL + attn_weight·relation KL. Validation
reports the student's NLL alone, so val/ppl is its perplexity whatever the weights.

The teacher is rebuilt from its source on every start (it is frozen, so a resumed run sees the
same one), and λ's step count is the stage's checkpointed state, so resuming is exact.
"""
import torch

from ..config import ConvertStageConfig
from ..losses import attention_relation_kl_sum, distillation_kl_sum, next_token_loss_sum
from ..quant import set_quant_strength, warmup_strength
from ..teacher import init_from_teacher, load_teacher
from .base import LossOutput
from .pretrain import PretrainStage

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class ConvertStage(PretrainStage):
    kind = "convert"
    token_loss = True

    def __init__(self, cfg: ConvertStageConfig, tokenizer, seed: int, max_seq_len: int):
        for key in ("nll_weight", "kd_weight", "attn_weight", "quant_warmup_steps"):
            if getattr(cfg, key) < 0:
                raise ValueError(f"convert stage: {key}={getattr(cfg, key)} is negative; use 0 (off) or more")
        if cfg.nll_weight + cfg.kd_weight + cfg.attn_weight == 0:
            raise ValueError("convert stage: nll_weight, kd_weight and attn_weight are all 0; set at least one > 0")
        if cfg.kd_temperature <= 0:
            raise ValueError(f"convert stage: kd_temperature={cfg.kd_temperature} must be > 0")
        if cfg.max_steps and cfg.quant_warmup_steps >= cfg.max_steps:
            raise ValueError(
                f"convert stage: quant_warmup_steps={cfg.quant_warmup_steps} is not below max_steps={cfg.max_steps}, "
                "so no step would train the ternary model that is saved; lower it"
            )
        super().__init__(cfg, tokenizer, seed, max_seq_len)
        self.cfg = cfg
        # λ follows the optimizer step, counted here from the training micro-batches (evaluation runs
        # in eval mode and is not counted); saved in each checkpoint, so a resume continues the warm-up.
        self.train_micro_batches = 0
        self.student = None
        self.teacher = None
        self.inserted_norms: list[torch.nn.Module] = []
        self.captured: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}

    def bind_model(self, model: torch.nn.Module) -> None:
        """Load the teacher and start the student from its weights (a resume then overwrites them)."""
        device = next(model.parameters()).device
        # A bf16 stage keeps its frozen teacher in bf16 too: half the memory (8B: 16 GB, not 32 GB).
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        self.teacher = load_teacher(self.cfg.teacher, dtype).to(device)
        self.inserted_norms = init_from_teacher(model, self.teacher)
        self.student = model
        if self.cfg.attn_weight:
            layer = self.cfg.attn_layer % model.config.num_hidden_layers
            for role, m in (("student", model), ("teacher", self.teacher)):
                attention = m.get_submodule(f"model.layers.{layer}.self_attn")
                for name in PROJECTIONS:
                    attention.get_submodule(name).register_forward_hook(self._capture(role))

    def _capture(self, role: str):
        def hook(module, inputs, output):
            self.captured[role].append(output)

        return hook

    def state_dict(self) -> dict:
        return {"train_micro_batches": self.train_micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.train_micro_batches = state["train_micro_batches"]

    def strength(self) -> float:
        """λ of the optimizer step under way: each step runs grad_accum training micro-batches."""
        return warmup_strength(self.train_micro_batches // self.cfg.grad_accum, self.cfg.quant_warmup_steps)

    def loss(self, model, batch: dict) -> LossOutput:
        if self.teacher is None:
            raise RuntimeError("ConvertStage.loss called before bind_model(): the teacher is missing")
        ids = batch["input_ids"].to(next(model.parameters()).device)
        for captured in self.captured.values():
            captured.clear()
        if model.training:
            lam = self.strength()
            set_quant_strength(self.student, lam)
            for norm in self.inserted_norms:
                norm.strength = lam
            self.train_micro_batches += 1
        logits = model(ids).logits
        nll, n = next_token_loss_sum(logits, ids)
        if not model.training:
            return LossOutput(nll, n)
        cfg = self.cfg
        # Metrics are sums over units, like the loss: λ·n averages back to λ.
        total, metrics = cfg.nll_weight * nll, {"nll": nll.detach(), "lambda": torch.tensor(lam * n)}
        if cfg.kd_weight or cfg.attn_weight:
            with torch.no_grad():
                teacher_logits = self.teacher(ids).logits
            if cfg.kd_weight:
                # Positions that predict a next token, the NLL's positions: the units are the same.
                kd = distillation_kl_sum(logits[:, :-1], teacher_logits[:, :-1], cfg.kd_temperature)
                total, metrics["kd"] = total + cfg.kd_weight * kd, kd.detach()
            if cfg.attn_weight:
                heads = model.config.num_key_value_heads  # divides the q and the k/v widths alike
                attn = attention_relation_kl_sum(
                    [x[:, :-1] for x in self.captured["student"]], [x[:, :-1] for x in self.captured["teacher"]], heads
                )
                total, metrics["attn"] = total + cfg.attn_weight * attn, attn.detach()
        return LossOutput(total, n, metrics)
