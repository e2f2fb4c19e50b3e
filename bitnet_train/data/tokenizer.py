"""Tokenizers: any Hugging Face tokenizer by name or path, or a built-in byte-level BPE.

The built-in one is trained with `tokenizers` on the built-in corpus the first time it is
asked for and cached, so the quickstart needs no download. It uses LLaMA 3's special-token
names and carries the 2B4T chat template.
"""
import hashlib
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..config import TokenizerConfig
from ..teacher import PACKAGE_PREFIX, load_teacher_tokenizer
from .builtin_text import builtin_documents

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

# 2B4T report: <|begin_of_text|>System: {sys}<|eot_id|>User: {q}<|eot_id|>Assistant: {a}<|eot_id|>
# The {% generation %} block lets transformers return the assistant-token mask for SFT labels.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}Assistant: {% generation %}"
    "{{ message['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}<|eot_id|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("BITNET_TRAIN_CACHE") or Path.home() / ".cache" / "bitnet_train"
    return Path(root)


def load_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    if cfg.name == "builtin":
        return builtin_tokenizer(cfg.vocab_size)
    if cfg.name.startswith(PACKAGE_PREFIX) or cfg.name.endswith(".gguf"):
        tok = load_teacher_tokenizer(cfg.name)  # a conversion's teacher spec (teacher.py)
    else:
        # trust_remote_code stays off: a tokenizer must not run code from a download.
        tok = AutoTokenizer.from_pretrained(cfg.name, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def builtin_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    docs = builtin_documents()
    key = hashlib.sha256(("\0".join(docs) + CHAT_TEMPLATE).encode()).hexdigest()[:12]
    path = cache_dir() / "tokenizers" / f"builtin-bpe{vocab_size}-{key}"
    if not (path / "tokenizer.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        wrap(train_bpe(docs, vocab_size)).save_pretrained(tmp)
        tmp.rename(path) if not path.exists() else None  # another process may have won the race
    return AutoTokenizer.from_pretrained(path)


def train_bpe(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, additional_special_tokens=[EOT]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
