"""Evaluation: zero-shot classification, retrieval, and the evaluator used during training."""
