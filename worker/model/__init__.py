"""The model itself: the Llama network, attention over the paged cache, sampling, the tokenizer, model files."""
