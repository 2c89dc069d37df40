"""A training stage killed mid-run resumes from its last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftstudy import synthetic
from ftstudy.atomic import write_jsonl
from ftstudy.params import Params, to_dict
from ftstudy.sources import convert_rows

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def _stage_dir(tmp: Path, tiny_model_dir: Path) -> Path:
    (tmp / "models").mkdir(parents=True)
    (tmp / "models" / "base").symlink_to(tiny_model_dir)
    recs = list(convert_rows("alpaca", synthetic.generate("alpaca", "train", 200, 0), 10**6, "last_turn"))
    write_jsonl(tmp / "data/processed/train.jsonl", recs)
    raw = to_dict(Params())
    raw["train"].update(batch_size=4, max_seq_len=96, max_prompt_tokens=64, save_steps=5, warmup_steps=0,
                        progress_bar=False)
    raw["train_lora_wide"].update(lora_r=4, lora_alpha=8, max_steps=STEPS, learning_rate=1e-3)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp


def _cmd():
    return [sys.executable, str(ROOT / "stages/train.py"), "lora_wide"]


def test_killed_training_resumes_from_checkpoint_with_the_same_result(tmp_path, tiny_model_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reference = _stage_dir(tmp_path / "ref", tiny_model_dir)
    work = _stage_dir(tmp_path / "work", tiny_model_dir)
    uninterrupted = subprocess.Popen(_cmd(), cwd=reference, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_cmd(), cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    ckpt = work / "checkpoints/lora_wide/checkpoint-10/trainer_state.json"
    while not ckpt.exists():
        assert proc.poll() is None, "training finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "models/lora_wide").exists()  # nothing that looks finished
    assert not (work / "metrics/train/lora_wide.json").exists()

    rerun = subprocess.run(_cmd(), cwd=work, env=env, check=True, capture_output=True, text=True)
    assert uninterrupted.wait(timeout=120) == 0
    expected = json.loads((reference / "metrics/train/lora_wide.json").read_text())
    assert "resuming lora_wide from" in rerun.stdout
    got = json.loads((work / "metrics/train/lora_wide.json").read_text())
    assert got["resumed_from_step"] >= 10 and got["steps"] == STEPS
    assert got["final_train_loss"] == pytest.approx(expected["final_train_loss"], abs=1e-6)
    steps = [int(line.split("\t")[0]) for line in
             (work / "dvclive/lora_wide/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))  # the curve has each step once, across the interruption
