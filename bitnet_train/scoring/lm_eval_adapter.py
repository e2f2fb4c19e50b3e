"""lm-evaluation-harness on our exported checkpoints: the model type `bitnet-train`.

The adapter wraps the inference engine (bitnet_train.engine), so lm_eval scores exactly what the
engine serves: packed ternary weights on the integer kernels. Install the harness with
`pip install -e .[eval]`, then either

    python -m bitnet_train.scoring.lm_eval_adapter --model bitnet-train \
        --model_args pretrained=out/own,head_dtype=fp32 --tasks hellaswag

(lm_eval's own command line, with this model type registered first), or from Python

    import bitnet_train.scoring.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="bitnet-train", model_args="pretrained=out/own", tasks=[...])

Requests run one at a time (the engine's batch is one sequence), which keeps scoring exact and
simple; the harness's tasks are small enough for that on a tiny model.
"""
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import AutoTokenizer

from .engine import Engine, Sampling, generate


@register_model("bitnet-train")
class BitNetTrainLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and generate_until on an Engine."""

    def __init__(self, pretrained: str, head_dtype: str = "fp32", device: str | None = None,
                 max_length: int | None = None, batch_size=1, **_):
        super().__init__()
        self.engine = Engine.from_export(pretrained, head_dtype, device)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self._max_length = int(max_length or self.engine.config.max_position_embeddings)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # Pretraining frames every document as <bos> text <eos>, so bos is what text follows.
        return self.tokenizer.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def tok_decode(self, tokens: list[int], **_) -> str:
        return self.tokenizer.decode(tokens)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it."""
        # Keep the last max_length tokens that are inputs: the final continuation token is only a target.
        seq = (context + continuation)[-(self.max_length + 1):]
        logits = self.engine.forward(torch.tensor([seq[:-1]]))[0, -len(continuation):]
        logp = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation)
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in requests:
            result = self._score(context, continuation)
            self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (r.args for r in requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(context, continuation)[0] for context, continuation in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sampling = Sampling(float(kwargs.get("temperature", 1.0)), int(kwargs.get("top_k", 0) or 0),
                                float(kwargs.get("top_p", 1.0) or 1.0)) if kwargs.get("do_sample") else Sampling()
            keep = max(1, self.max_length - max_new)  # room for the reply within the model's context
            prompt = [self.prefix_token_id, *self.tok_encode(context)][-keep:]
            new = generate(self.engine, prompt, max_new, sampling, stop_ids=(self.eot_token_id,),
                           stop_when=lambda ids: any(s in self.tok_decode(ids) for s in until))
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:  # the harness's convention: the reply ends before the first stop string
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main() -> None:
    """lm_eval's command line with the `bitnet-train` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
