"""Data: sources (built-in, local files, hub), the tokenizer, token blocks and the batch stream."""
