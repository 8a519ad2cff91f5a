"""A checkpoint of a model=hf run of train.py back to a Hugging Face model directory."""

from pathlib import Path

from evaluation.loading import load_checkpoint


def export_hf(ckpt_path: str, out_dir: str) -> None:
    """The fine-tuned model as a Hugging Face directory (LoRA merged into the weights) with the tokenizer of the model
    it started from: for eval, serving or the next fine-tuning."""
    from transformers import AutoTokenizer

    model, info = load_checkpoint(Path(ckpt_path), backend="auto")  # the backend applies to our GPT only
    if "hf_path" not in info["model"]:
        raise ValueError(f"{ckpt_path} is a checkpoint of our GPT, not of a model=hf run: nothing to export")
    hf = model.hf.merge_and_unload() if hasattr(model.hf, "merge_and_unload") else model.hf  # peft: fold LoRA in
    hf.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(info["model"]["hf_path"], local_files_only=True).save_pretrained(out_dir)
