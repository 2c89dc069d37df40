"""Two clean runs give identical data files and, on CPU, identical training metrics."""

from __future__ import annotations

from ftstudy.data import fetch_data, preprocess
from ftstudy.methods import method_spec
from ftstudy.params import default_params
from ftstudy.training import train


def _data(tmp, tokenizer):
    p = default_params(data=dict(pool_per_source=120, train_per_source=40, test_per_source=10)).data
    fetch_data(p, 7, tmp / "raw")
    stats = preprocess(p, 7, tmp / "raw", tmp / "processed", tokenizer=tokenizer)
    return stats


def test_fetch_and_preprocess_are_byte_identical(tmp_path, tiny_tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _data(a, tiny_tokenizer) == _data(b, tiny_tokenizer)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 7
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_validation_rows_come_from_the_training_pool_and_never_overlap_test_or_train(tmp_path, tiny_tokenizer):
    import json

    stats = _data(tmp_path, tiny_tokenizer)
    split = {name: [json.loads(line) for line in (tmp_path / f"processed/{name}.jsonl").read_text().splitlines()]
             for name in ("train", "val", "test")}
    ids = {name: {r["id"] for r in rows} for name, rows in split.items()}
    assert len(split["val"]) == stats["val_rows"] == 3 * 20  # val_per_source from conf/, three sources
    assert not ids["val"] & ids["test"] and not ids["val"] & ids["train"] and not ids["train"] & ids["test"]
    content = {name: {json.dumps([r["history"], r["instruction"], r["input"], r["response"]]) for r in rows}
               for name, rows in split.items()}
    assert not content["val"] & content["test"]
    # Training takes examples in file order: the sources come interleaved, not one after another.
    assert len({r["source"] for r in split["train"][:12]}) == 3


def test_same_seed_same_training_metrics_on_cpu(tmp_path, tiny_model_dir, tiny_tokenizer):
    _data(tmp_path / "d", tiny_tokenizer)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/base").symlink_to(tiny_model_dir)
    params = default_params(train=dict(batch_size=4, max_seq_len=96, max_prompt_tokens=64, warmup_steps=0, max_steps=3),
                            train_qlora=dict(lora_r=4, lora_alpha=8), ui=dict(progress_bar=False))
    runs = []
    for i in range(2):
        m = train(method_spec(params, "qlora"), params, train_path=tmp_path / "d/processed/train.jsonl",
                  models_dir=tmp_path / "models", out_dir=tmp_path / f"out{i}", ckpt_dir=tmp_path / f"ck{i}",
                  live_dir=None)
        runs.append({k: m[k] for k in ("final_train_loss", "mean_train_loss", "trained_tokens", "steps")})
    assert runs[0] == runs[1]


def test_asking_for_more_samples_than_clean_rows_names_the_fix(tmp_path):
    import pytest

    from ftstudy.errors import UserError

    p = default_params(data=dict(source="hub", pool_per_source=30, train_per_source=500, test_per_source=5)).data
    raw = default_params(data=dict(pool_per_source=30, train_per_source=20, val_per_source=2, test_per_source=5)).data
    fetch_data(raw, 0, tmp_path / "raw")  # 30 rows per source, shaped like the hub's
    with pytest.raises(UserError, match=r"data.train_per_source \+ val_per_source=520 but alpaca has only \d+ clean "
                                        r"train rows.*lower data.train_per_source \+ val_per_source or raise "
                                        r"data.pool_per_source"):
        preprocess(p, 0, tmp_path / "raw", tmp_path / "processed")
    assert not (tmp_path / "processed").exists()
