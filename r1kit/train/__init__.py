"""Training: corpora, batching and recipes."""
