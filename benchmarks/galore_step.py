"""The project's GaLore 8-bit optimizers (ftstudy.galore) against galore-torch's and transformers', on a GPU.

    python benchmarks/galore_step.py            # needs CUDA (bitsandbytes' 8-bit optimizers)

1. The step: two copies of the same weights (gemma-3-1b's attention and MLP shapes, and a norm vector outside
   GaLore's targets) receive the same gradients for a few steps, one through galore-torch's step and one
   through ``galore_8bit_step``, with a projection update gap of 2 so the SVD reprojection is exercised.
   Prints the largest difference between the copies, whether each weight stayed in its storage, and the time
   per optimizer step of each.
2. Layer-wise: two copies of a 2-layer model with gemma-3-1b's layer shapes train 6 steps on the same batches,
   one with transformers' ``galore_adamw_8bit_layerwise`` (given the rate of the project's schedule at every
   step), one with ``LayerwiseGaLore``; prints the largest weight difference and the time per step of each.
Both on the project's subclass (``adamw_8bit_class``: galore-torch's arguments bound by name) and projector, as the
training stages run them; the original step is galore-torch's, called on it.
"""

from __future__ import annotations

import json
import statistics
import time
from unittest import mock

import torch


def main() -> dict:
    rec = single()
    rec["layerwise"] = layerwise()
    print(json.dumps(rec))
    return rec


def _on_the_projects_basis():
    """galore-torch's 8-bit optimizer with the project's projector, as the training stages and tests/test_galore.py
    run it: galore-torch's own full-SVD basis fixes the singular vectors' signs (and, where singular values nearly
    tie, their rotation) another way, which Adam's per-coordinate moments do not undo."""
    import galore_torch.adamw8bit

    from ftstudy.galore import _projector_class

    return mock.patch.object(galore_torch.adamw8bit, "GaLoreProjector", _projector_class())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


SHAPES = [(1024, 1152), (256, 1152), (1152, 1024), (6912, 1152), (1152, 6912)]  # gemma-3-1b's projected weights


def single(steps: int = 8, device: str = "cuda", shapes: list[tuple[int, int]] = SHAPES) -> dict:
    """Part 1 (above), on ``device``, with ``shapes`` in place of gemma-3-1b's (the tests run it small on the CPU).
    galore-torch's step takes the project's projector too (on its own basis the copies ended up to 0.0015 apart
    after 8 steps on an H200): what remains to compare is the update."""
    import galore_torch

    from ftstudy.galore import adamw_8bit_class, galore_8bit_step

    original = galore_torch.GaLoreAdamW8bit.step
    torch.manual_seed(0)
    init = [(torch.randn(s) * 0.02).to(device, torch.bfloat16) for s in shapes]
    norm0 = torch.ones(shapes[0][1], device=device, dtype=torch.bfloat16)
    copies = []
    for _ in range(2):
        ws = [torch.nn.Parameter(w.clone()) for w in init]
        norm = torch.nn.Parameter(norm0.clone())
        opt = adamw_8bit_class()([{"params": [norm]}, {"params": ws, "rank": 128, "update_proj_gap": 2,
                                                       "scale": 0.25, "proj_type": "std"}], lr=1e-3, weight_decay=0.01)
        copies.append((ws + [norm], opt))
    times = {"galore_torch": [], "project": []}
    moved = {"galore_torch": 0, "project": 0}
    with _on_the_projects_basis():
        for step in range(steps):
            grads = [torch.randn_like(p) * 0.01 for p in copies[0][0]]
            for (params, opt), name, fn in zip(copies, times, (original, galore_8bit_step), strict=True):
                ptrs = [p.data_ptr() for p in params]
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
                _sync(device)
                t0 = time.perf_counter()
                fn(opt)
                _sync(device)
                if step >= 2:
                    times[name].append(time.perf_counter() - t0)
                moved[name] += sum(p.data_ptr() != q for p, q in zip(params, ptrs, strict=True))
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(copies[0][0], copies[1][0], strict=True))
    change = max((a.float() - w.float()).abs().max().item() for a, w in zip(copies[0][0], init + [norm0], strict=True))
    return {"max_abs_diff": diff, "max_abs_change": change, "weights_moved": moved,
            "step_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}}


def layerwise(steps: int = 6, device: str = "cuda", widths: dict | None = None) -> dict:
    """Part 2 (above), on ``device``, with ``widths`` in place of gemma-3-1b's (hidden_size and so on; the tests
    run it small on the CPU)."""
    # transformers builds its layer-wise optimizers from galore-torch's class, looked up by name: the reference takes
    # the project's subclass (bitsandbytes' arguments bound by name; galore-torch's own leaves every 32-bit-state
    # weight, Gemma's norms, untrained under bitsandbytes 0.50) on the project's basis: what remains to compare is
    # the layer-wise batching, as in tests/test_galore.py.
    import galore_torch

    from ftstudy.galore import adamw_8bit_class

    with mock.patch.object(galore_torch, "GaLoreAdamW8bit", adamw_8bit_class()), _on_the_projects_basis():
        return _layerwise(steps, device, widths or {})


def _layerwise(steps: int, device: str, widths: dict) -> dict:
    import tempfile

    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Trainer, TrainingArguments

    from ftstudy.arch import GEMMA3_1B
    from ftstudy.galore import LayerwiseGaLore
    from ftstudy.methods import galore_target_patterns

    config = Gemma3TextConfig(**{**GEMMA3_1B, "num_hidden_layers": 2, "vocab_size": 32768, **widths})
    cuda = device == "cuda"
    torch.manual_seed(0)
    init = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).state_dict()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, config.vocab_size, (4, 512), generator=g).to(device) for _ in range(steps)]
    # Deterministic kernels (the embedding's backward adds with atomics otherwise): two runs of one optimizer agree
    # bit for bit, so any difference left between the two optimizers is theirs. The second transformers run checks it.
    torch.use_deterministic_algorithms(True)
    models, times, rates = [], {}, None
    for name in ("project", "transformers", "transformers again"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
        model.load_state_dict(init)
        with tempfile.TemporaryDirectory() as td:
            args = TrainingArguments(output_dir=td, optim="galore_adamw_8bit_layerwise", learning_rate=1e-3,
                                     optim_target_modules=galore_target_patterns(["self_attn", "mlp"]),
                                     optim_args="rank=128,update_proj_gap=2,scale=0.25", lr_scheduler_type="linear",
                                     warmup_steps=2, max_steps=steps, bf16=cuda, use_cpu=not cuda,
                                     report_to="none")
            trainer = Trainer(model=model, args=args)
            if name == "project":
                trainer.optimizer = LayerwiseGaLore.from_trainer_args(model, args)
                trainer.create_optimizer_and_scheduler(num_training_steps=steps)
                rates = []
            else:
                trainer.create_optimizer()
        opt, took = trainer.optimizer, []
        for step, ids in enumerate(batches):
            if name == "project":
                rates.append(opt.param_groups[0]["lr"])
            else:
                for o in opt.optimizer_dict.values():
                    o.param_groups[0]["lr"] = rates[step]
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            if name == "project":
                trainer.lr_scheduler.step()
            opt.zero_grad()
            _sync(device)
            took.append(time.perf_counter() - t0)
        times[name] = round(statistics.median(took[2:]) * 1000, 1)
        models.append(model)
    torch.use_deterministic_algorithms(False)
    a, b, c = (dict(m.named_parameters()) for m in models)
    diff = {n: (a[n].float() - b[n].float()).abs().max().item() for n in a}
    control = max((b[n].float() - c[n].float()).abs().max().item() for n in a)
    return {"max_abs_diff": max(diff.values()), "params_differing": sorted(n for n, v in diff.items() if v > 0),
            "params": len(diff), "control_max_abs_diff": control, "rates": rates, "step_ms": times,
            "max_abs_change": max((a[n].float() - init[n].float().to(device)).abs().max().item() for n in a)}


if __name__ == "__main__":
    main()
