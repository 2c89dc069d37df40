"""Host time of the Trainer's per-step bookkeeping: transformers' own against ftstudy.trainer's, in one run.

    python benchmarks/host_bookkeeping.py      # CPU, ~1 minute

Every training step the Trainer counts FLOPs (a walk over every parameter), puts the model in training mode and
clears its gradients (walks over every module) and clips the gradients (a list of every parameter). The model here
has gemma-3-1b's module structure (26 decoder layers, each method's LoRA) at tiny widths, so the walks cost what
they cost on gemma-3-1b and the arithmetic is negligible. Each method's model gets both bookkeepings, timed on the
same process; ftstudy.trainer's are tested to give the same numbers and modes (tests/test_training.py).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftstudy.methods import method_spec  # noqa: E402
from ftstudy.models import tiny_config, train_tiny_tokenizer  # noqa: E402
from ftstudy.params import default_params  # noqa: E402
from ftstudy.prepare import prepare_model  # noqa: E402
from ftstudy.trainer import completion_trainer_class, quick_bookkeeping  # noqa: E402


def per_call_ms(f, n: int = 40) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="host_bookkeeping_"))
    tokenizer = train_tiny_tokenizer(512, seed=0)
    config = tiny_config(default_params().model.tiny, len(tokenizer))
    config.num_hidden_layers = 26  # gemma-3-1b's: five sliding-window layers, then one global, repeated
    config.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")
    p = default_params()
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, gradient_checkpointing=True))
    args = TrainingArguments(output_dir=str(work / "out"), report_to="none", use_cpu=True, max_grad_norm=1.0)
    batch = {"input_ids": torch.zeros(8, 512, dtype=torch.long)}
    print(f"{'method':10} {'modules':>8} {'params':>7} {'Trainer ms/step':>16} {'ours ms/step':>13} {'ratio':>7}")
    for method in ("qlora", "lora_wide"):
        model, _, _ = prepare_model(method_spec(p, method), p, work / "base", work)
        modules, weights = sum(1 for _ in model.modules()), sum(1 for _ in model.parameters())
        before, after = compare(model, completion_trainer_class()(model=model, args=args), batch)
        print(f"{method:10} {modules:>8} {weights:>7} {before:>16.2f} {after:>13.2f} {before / after:>6.0f}x")


def compare(model, trainer, batch: dict) -> tuple[float, float]:
    """ms per step of the Trainer's bookkeeping, then of ours, on ``model``."""
    from transformers import Trainer

    def theirs():
        Trainer.floating_point_ops(trainer, batch)
        type(model).train(model)
        type(model).zero_grad(model)
        Trainer._clip_grad_norm(trainer, model)

    def ours():
        trainer.floating_point_ops(batch)
        model.train()
        model.zero_grad()
        trainer._clip_grad_norm(model)

    before = per_call_ms(theirs)
    quick_bookkeeping(model)
    return before, per_call_ms(ours)

if __name__ == "__main__":
    main()
