"""Evaluation metrics, one module per task: retrieval, classification, sed, grounding.

Each works on plain arrays or sed_scores_eval score DataFrames, never on a
model, so scores from any system are measured the same way.
"""
