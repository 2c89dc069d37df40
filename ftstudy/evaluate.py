"""Evaluate one model (or the re-rank ensemble) on the shared held-out test set.

Writes the predictions (one row per test item, with its ROUGE-L) and a metrics file with BLEU-4 and
ROUGE-L overall and per source; the seeds' showcase prompts are answered too, for the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

import torch

from ftstudy.atomic import read_jsonl, weights_digest, write_json, write_jsonl
from ftstudy.clock import Clock
from ftstudy.data import task_families
from ftstudy.generation import generate
from ftstudy.heldout import read_test_sets, reference_losses
from ftstudy.metrics import accuracy_by, exact_match, rouge_l_items, score_by_source, summarize
from ftstudy.models import compute_dtype, device_kind, load_model, load_tokenizer, merged_model
from ftstudy.params import Params


def load_for_eval(model_dir: str | Path, base_dir: str | Path):
    """A trained model ready for generation: adapters are merged into the full-precision base.

    QLoRA's adapter too: merged into the unquantized base is how such adapters are usually served, and it
    puts every adapter on the same base.
    """
    device, dtype = device_kind(), compute_dtype()
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").exists():
        return merged_model(Path(base_dir), model_dir, dtype, device).eval()
    return load_model(model_dir, dtype=dtype, device=device)


def _showcase(model, tokenizer, params: Params) -> list[dict]:
    p = params.evaluate
    recs = [{"instruction": q, "input": "", "history": []} for q in p.showcase_prompts]
    answers, _ = generate(model, tokenizer, recs, max_new_tokens=p.max_new_tokens, batch_size=p.batch_size,
                          max_prompt_tokens=p.max_prompt_tokens, progress=False)
    return [{"prompt": q, "answer": a} for q, a in zip(p.showcase_prompts, answers, strict=True)]


def write_results(name: str, records: list[dict], predictions: list[str], extra: dict, params: Params,
                  predictions_path: str | Path, metrics_path: str | Path, extra_rows: list[dict] | None = None,
                  extra_metrics: dict | None = None, clock: Clock | None = None) -> dict:
    """``clock``: the evaluation's phases so far, written with one more (scoring) under generation.seconds."""
    rows = [{"id": r["id"], "source": r["source"], "prediction": pred, "reference": r["response"]}
            for r, pred in zip(records, predictions, strict=True)]
    scores = score_by_source(rows)
    for i, (row, item) in enumerate(zip(rows, scores.pop("rouge_l_items"), strict=True)):
        row["rouge_l_f1"] = round(item, 6)
        if extra_rows:
            row.update(extra_rows[i])
    families = task_families(params.data, params.data.seed)
    if families:  # generated data: its references are computed, so a prediction is right or wrong
        for row in rows:
            row["family"] = families.get(row["id"], "unknown")
            row["exact_match"] = int(exact_match(row["prediction"], row["reference"]))
        scores["accuracy"] = accuracy_by(rows)
    if clock is not None:
        clock.lap("score")
    device = device_kind()
    metrics = {"model": name, "profile": params.profile, **scores,
               "generation": {**extra, **({"seconds": clock.laps} if clock else {}),
                              "max_new_tokens": params.evaluate.max_new_tokens,
                              "batch_size": params.evaluate.batch_size, "device": device,
                              "torch": torch.__version__, "python": platform.python_version()},
               **(extra_metrics or {})}
    write_jsonl(predictions_path, rows)
    write_json(metrics_path, metrics)
    return metrics


def _extra_sets(model, tokenizer, sets: dict[str, list[dict]], params: Params, out_dir: Path,
                progress: bool) -> dict:
    """Each out-of-distribution set answered (BLEU-4, ROUGE-L) and its references scored by teacher forcing; the
    rows go to ``out_dir/<set>.jsonl`` for the report's paired intervals."""
    p, results = params.evaluate, {}
    for set_name, records in sets.items():
        predictions, stats = generate(model, tokenizer, records, max_new_tokens=p.max_new_tokens,
                                      batch_size=p.batch_size, max_prompt_tokens=p.max_prompt_tokens,
                                      progress=progress, batch_tokens=p.batch_tokens)
        references = [r["response"] for r in records]
        losses = reference_losses(model, tokenizer, records, max_prompt_tokens=p.max_prompt_tokens,
                                  max_response_tokens=params.train.max_seq_len, batch_size=p.batch_size)
        rouge = rouge_l_items(predictions, references)
        write_jsonl(out_dir / f"{set_name}.jsonl", [
            {"id": r["id"], "prediction": pred, "reference": r["response"], "rouge_l_f1": round(rl, 6),
             "reference_loss": round(loss, 6)}
            for r, pred, rl, loss in zip(records, predictions, rouge, losses, strict=True)])
        results[set_name] = {**summarize(predictions, references, rouge),
                             "mean_reference_loss": round(sum(losses) / len(losses), 6),
                             "generate_seconds": stats["generate_seconds"]}
    return results


def evaluate(name: str, model_dir: str | Path, base_dir: str | Path, test_path: str | Path, params: Params,
             predictions_path: str | Path, metrics_path: str | Path, showcase_path: str | Path,
             progress: bool = True) -> dict:
    """The rows of ``evaluate.extra_test_sets`` go beside ``predictions_path``, to ``extra/<name>/<set>.jsonl``."""
    p = params.evaluate
    sets = read_test_sets(p.extra_test_sets)  # checked before a model is loaded
    clock = Clock()
    records = read_jsonl(test_path)
    tokenizer = load_tokenizer(base_dir)
    model = load_for_eval(model_dir, base_dir)
    fp = eval_fingerprint(model_dir, base_dir, test_path, p)
    clock.lap("load")
    journal = journal_path(predictions_path)
    predictions, gen_stats = generate(
        model, tokenizer, records, max_new_tokens=p.max_new_tokens, batch_size=p.batch_size,
        max_prompt_tokens=p.max_prompt_tokens, progress=progress, journal=journal, fingerprint=fp,
        batch_tokens=p.batch_tokens,
    )
    clock.lap("test_set")
    write_jsonl(showcase_path, _showcase(model, tokenizer, params))
    clock.lap("showcase")
    extra = {}
    if sets:
        extra_dir = Path(predictions_path).parent / "extra" / name
        extra = {"extra_test_sets": _extra_sets(model, tokenizer, sets, params, extra_dir, progress)}
        clock.lap("extra_test_sets")
    # Where the stage's time went (model loading to scoring), so its cost at another size can be estimated.
    metrics = write_results(name, records, predictions, gen_stats, params, predictions_path, metrics_path,
                            extra_metrics=extra, clock=clock)
    journal.unlink()
    return metrics


JOURNALS = Path("checkpoints/evaluate")


def journal_path(predictions_path: str | Path) -> Path:
    """Where an evaluation in progress keeps its finished batches: outside every folder a stage depends on or
    writes (DVC would see a killed run's journal as a change), and not a DVC output, so a rerun finds it."""
    return JOURNALS / f"{Path(predictions_path).stem}.jsonl"


def eval_fingerprint(model_dir, base_dir, test_path, p) -> str:
    """What the predictions depend on: model weights, base, test set and generation settings."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(p), sort_keys=True).encode())
    for d in dict.fromkeys([Path(base_dir), Path(model_dir)]):  # the base alone when it is the model evaluated
        h.update(weights_digest(d))
    h.update(Path(test_path).read_bytes())
    return h.hexdigest()


def evaluate_rerank(models_dir: str | Path, test_path: str | Path, params: Params, predictions_path: str | Path,
                    metrics_path: str | Path, progress: bool = True) -> dict:
    """Seed 004's ensemble, evaluated like any model; its extra cost is reported as time."""
    from ftstudy.rerank import rerank

    models_dir, r, p = Path(models_dir), params.rerank, params.evaluate
    clock = Clock()
    records = read_jsonl(test_path)
    tokenizer = load_tokenizer(models_dir / "base")
    proposer = load_for_eval(models_dir / r.proposer, models_dir / "base")
    scorer = load_for_eval(models_dir / r.scorer, models_dir / "base")
    clock.lap("load")
    chosen, candidates, timing = rerank(
        proposer, scorer, tokenizer, records, k=r.k, temperature=r.temperature, top_p=r.top_p,
        max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, max_prompt_tokens=p.max_prompt_tokens,
        seed=params.seed, progress=progress,
    )
    clock.lap("rerank")
    extra = {**timing, "k": r.k, "temperature": r.temperature, "top_p": r.top_p, "proposer": r.proposer,
             "scorer": r.scorer}
    return write_results("rerank", records, chosen, extra, params, predictions_path, metrics_path,
                         extra_rows=[{"candidates": c} for c in candidates], clock=clock)
