"""Evaluation pieces that eval.py loads only when used."""
