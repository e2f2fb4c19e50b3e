"""The evaluation engine: an exported checkpoint (our packed format) run on the ternary kernels.

    engine = Engine.from_export("out/own")            # CUDA door on a GPU, CPU door otherwise
    logits = engine.forward(ids)                       # (B, T, vocab), float32
    new_ids = generate(engine, prompt_ids, 32)         # greedy; Sampling(temperature=...) samples
    perplexity(engine, token_blocks(tok, docs, 128))   # next-token NLL and perplexity

It computes the training model's function (model.py) with integer products in place of the fake
quantization: tests/test_engine.py holds it to the training model's logits and greedy tokens.
"""
from .generate import Sampling, generate
from .model import Engine, KVCache
from .perplexity import Perplexity, perplexity, read_documents, token_blocks
from .weights import HEAD_DTYPES, EngineWeights, Head, load_weights

__all__ = [
    "Engine", "EngineWeights", "HEAD_DTYPES", "Head", "KVCache", "Perplexity", "Sampling", "generate",
    "load_weights", "perplexity", "read_documents", "token_blocks",
]
