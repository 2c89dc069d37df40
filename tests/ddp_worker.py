"""One worker of tests/test_distributed.py's multi-process run (launched by torchrun; not a test itself)."""

import json
import sys
from pathlib import Path

from ftstudy.methods import method_spec
from ftstudy.params import default_params
from ftstudy.training import train

workdir, processes = Path(sys.argv[1]), int(sys.argv[2])
nnodes, endpoint = (int(sys.argv[3]), sys.argv[4]) if len(sys.argv) > 3 else (1, "")  # processes are per machine
params = default_params(train=dict(batch_size=4, max_seq_len=96, max_prompt_tokens=64, save_steps=100, warmup_steps=0,
                                   num_processes=processes, nnodes=nnodes, rdzv_endpoint=endpoint, max_steps=4),
                        train_lora_wide=dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2,
                                             target_modules=["q_proj", "down_proj"]),
                        ui=dict(progress_bar=False))
m = train(method_spec(params, "lora_wide"), params, train_path=workdir / "train.jsonl", models_dir=workdir / "models",
          out_dir=workdir / "models" / "lora_wide", ckpt_dir=workdir / "ck", live_dir=workdir / "live")
if m is not None:
    (workdir / "metrics.json").write_text(json.dumps(m))
