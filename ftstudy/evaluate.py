"""Evaluate one model on the shared held-out test set: predictions and BLEU-4 / ROUGE-L metrics."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ftstudy.atomic import read_jsonl, write_json, write_jsonl
from ftstudy.generation import generate
from ftstudy.metrics import score_by_source
from ftstudy.models import load_model, load_tokenizer
from ftstudy.training import merged_model
from ftstudy.params import Params


def evaluate(name: str, model_dir: str | Path, base_dir: str | Path, test_path: str | Path, params: Params,
             predictions_path: str | Path, metrics_path: str | Path, progress: bool = True) -> dict:
    p = params.evaluate
    records = read_jsonl(test_path)
    model_dir, base_dir = Path(model_dir), Path(base_dir)
    tokenizer = load_tokenizer(base_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if (model_dir / "adapter_config.json").exists():
        # Adapters are evaluated merged into the full-precision base (QLoRA's too): the usual way to serve them,
        # and the same base for every adapter.
        model = merged_model(base_dir, model_dir, dtype).to(device).eval()
    else:
        model = load_model(model_dir, dtype=dtype, device=device)
    predictions, gen_stats = generate(
        model, tokenizer, records, max_new_tokens=p.max_new_tokens, batch_size=p.batch_size,
        max_prompt_tokens=p.max_prompt_tokens, progress=progress,
    )
    rows = [{"id": r["id"], "source": r["source"], "prediction": pred, "reference": r["response"]}
            for r, pred in zip(records, predictions, strict=True)]
    scores = score_by_source(rows)
    for row, item in zip(rows, scores.pop("rouge_l_items"), strict=True):
        row["rouge_l_f1"] = round(item, 6)
    metrics = {
        "model": name,
        "profile": params.profile,
        **scores,
        "generation": {**gen_stats, "max_new_tokens": p.max_new_tokens, "batch_size": p.batch_size,
                       "device": device, "torch": torch.__version__, "python": platform.python_version()},
    }
    write_jsonl(predictions_path, rows)
    write_json(metrics_path, metrics)
    return metrics
