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
from ftstudy.params import default_params, to_dict
from ftstudy.sources import convert_rows

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def _stage_dir(tmp: Path, tiny_model_dir: Path) -> Path:
    """A stage's working directory: the tiny base, generated rows, params with STEPS steps per method."""
    (tmp / "models").mkdir(parents=True)
    (tmp / "models" / "base").symlink_to(tiny_model_dir)
    recs = list(convert_rows("alpaca", synthetic.generate("alpaca", "train", 200, 0), 10**6, "last_turn"))
    write_jsonl(tmp / "data/processed/train.jsonl", recs)
    write_jsonl(tmp / "data/processed/val.jsonl", recs[:4])
    raw = to_dict(default_params())
    raw["train"].update(batch_size=4, max_seq_len=96, max_prompt_tokens=64, save_steps=5, warmup_steps=0, max_steps=STEPS)
    raw["ui"]["progress_bar"] = False
    raw["train_lora_wide"].update(lora_r=4, lora_alpha=8, learning_rate=1e-3)
    # Projections recomputed every 4 steps, so the resumed run needs the saved ones and the moments alike.
    raw["train_galore"].update(rank=4, update_proj_gap=4, learning_rate=1e-3)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp


def _cmd(method: str):
    return [sys.executable, str(ROOT / "stages/train.py"), method]


# galore: the CPU layer-wise optimizer, whose state (moments, step counts, projections) lives outside the
# Trainer's usual places and must be in its checkpoints too.
@pytest.mark.parametrize("method", ["lora_wide", "galore"])
def test_killed_training_resumes_from_checkpoint_with_the_same_result(tmp_path, tiny_model_dir, method):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reference = _stage_dir(tmp_path / "ref", tiny_model_dir)
    work = _stage_dir(tmp_path / "work", tiny_model_dir)
    uninterrupted = subprocess.Popen(_cmd(method), cwd=reference, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_cmd(method), cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    ckpt = work / f"checkpoints/{method}/checkpoint-10/trainer_state.json"
    while not ckpt.exists():
        assert proc.poll() is None, "training finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / f"models/{method}").exists()  # nothing that looks finished
    assert not (work / f"metrics/train/{method}.json").exists()

    rerun = subprocess.run(_cmd(method), cwd=work, env=env, check=True, capture_output=True, text=True)
    assert uninterrupted.wait(timeout=120) == 0
    expected = json.loads((reference / f"metrics/train/{method}.json").read_text())
    assert f"resuming {method} from" in rerun.stdout
    got = json.loads((work / f"metrics/train/{method}.json").read_text())
    assert got["resumed_from_step"] >= 10 and got["steps"] == STEPS
    assert got["final_train_loss"] == pytest.approx(expected["final_train_loss"], abs=1e-6)
    steps = [int(line.split("\t")[0]) for line in
             (work / f"dvclive/{method}/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS + 1))  # the curve has each step once, across the interruption
