"""Evaluation as a library, under eval.py: loading (checkpoints of our GPT and of model=hf runs, data, device),
metrics (BPB, importance, head ablation), report (one checkpoint, several, a Hugging Face model), sample (text),
export (a model=hf checkpoint back to a Hugging Face directory) and harness (lm-evaluation-harness, imported only
when tasks are asked for)."""
