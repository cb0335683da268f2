"""Evaluation: perplexity and response metrics."""
