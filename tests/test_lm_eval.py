"""lm-evaluation-harness on an export: the `bitnet-train` model type scores with the engine, and a
local YAML task over a JSONL file runs end to end without network."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval])")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bitnet_train.config import TokenizerConfig  # noqa: E402
from bitnet_train.data.tokenizer import load_tokenizer  # noqa: E402
from bitnet_train.engine import Engine, generate  # noqa: E402
from bitnet_train.export import export  # noqa: E402
from bitnet_train.scoring.lm_eval_adapter import BitNetTrainLM  # noqa: E402  (registers "bitnet-train")
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM  # noqa: E402
from bitnet_train.checkpoint import save_final  # noqa: E402

QUESTIONS = [
    {"question": "The opposite of true is", "choices": ["False", "True", "None"], "answer": 0},
    {"question": "def main():\n    return", "choices": ["0", "while", "import"], "answer": 0},
    {"question": "A list is created with", "choices": ["[]", "{}", "()"], "answer": 0},
]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    tok = load_tokenizer(TokenizerConfig())
    torch.manual_seed(0)
    config = BitNetTrainConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("lm_eval")
    save_final(BitNetTrainForCausalLM(config), tok, root / "pretrain" / "final")
    export(root / "pretrain" / "final", root / "export", "own")
    return root / "export" / "own"


@pytest.fixture(scope="module")
def lm(export_dir) -> BitNetTrainLM:
    return BitNetTrainLM(pretrained=str(export_dir), device="cpu")


def request(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def reference_logprob(lm: BitNetTrainLM, ids: list[int], n_targets: int) -> float:
    """log p of the last n_targets tokens of ids, from the engine's full-sequence logits."""
    logp = F.log_softmax(lm.engine.forward(torch.tensor([ids[:-1]]))[0], dim=-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(len(ids) - n_targets, len(ids))))


def test_loglikelihood_is_the_engines_continuation_logprob(lm):
    (logp, greedy), = lm.loglikelihood([request("loglikelihood", ("The opposite of", " true is"))])
    ctx, cont = lm.tok_encode("The opposite of"), lm.tok_encode(" true is")
    assert ctx + cont == lm.tok_encode("The opposite of true is")
    assert logp == pytest.approx(reference_logprob(lm, ctx + cont, len(cont)), rel=1e-5)
    assert logp < 0 and isinstance(greedy, bool)


def test_rolling_loglikelihood_covers_long_text_in_windows(lm):
    text = "Python is a programming language. " * 12
    ids = lm.tok_encode(text)
    assert len(ids) > 2 * lm.max_length  # several windows of the 32-token context
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    # Each token predicted once: the first window from <bos>, later ones from the tokens before.
    expected = reference_logprob(lm, [lm.prefix_token_id, *ids[:lm.max_length]], lm.max_length)
    start = lm.max_length
    while start < len(ids):
        end = min(start + lm.max_length, len(ids))
        window = ids[end - lm.max_length - 1:end]
        expected += reference_logprob(lm, window, end - start)
        start = end
    assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_engine_greedy_cut_at_the_stop_string(lm):
    context = "def main():"
    free = lm.tokenizer.decode(generate(lm.engine, [lm.prefix_token_id, *lm.tok_encode(context)], 8))
    stop = free[len(free) // 2:][:2]
    (text,) = lm.generate_until([request("generate_until", (context, {"until": [stop], "max_gen_toks": 8}))])
    assert text == free.split(stop)[0]


def write_tasks(root: Path) -> Path:
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "bitnet_tiny_mc.yaml").write_text(f"""\
task: bitnet_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (root / "bitnet_tiny_gen.yaml").write_text(f"""\
task: bitnet_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return root


def test_a_local_task_runs_through_the_harness(lm, export_dir, tmp_path):
    tasks = write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="bitnet-train", model_args=f"pretrained={export_dir},device=cpu",
        tasks=["bitnet_tiny_mc", "bitnet_tiny_gen"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    assert 0.0 <= results["results"]["bitnet_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["bitnet_tiny_gen"]
    # The harness's per-choice scores are the adapter's, which are the engine's.
    samples = results["samples"]["bitnet_tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for args, resp in zip(sample["arguments"], sample["resps"]):
            (logp, _), = lm.loglikelihood([request("loglikelihood", tuple(args))])
            assert resp[0][0] == pytest.approx(logp, rel=1e-6)
