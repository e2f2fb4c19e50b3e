"""Data: sources (built-in, local files, hub), the tokenizer, packing and the batch stream."""
