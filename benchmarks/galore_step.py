"""The project's GaLore 8-bit step (ftstudy.fastpath.galore_8bit_step) against galore-torch's own, on a GPU.

    python benchmarks/galore_step.py            # needs CUDA (bitsandbytes' 8-bit optimizers)

Two copies of the same weights (gemma-3-1b's attention and MLP shapes, and a norm vector outside GaLore's
targets) receive the same gradients for a few steps, one through each step function, with a projection update
gap of 2 so the SVD reprojection is exercised. Prints the largest difference between the copies, whether each
weight stayed in its storage, and the time per optimizer step of each.
"""

from __future__ import annotations

import json
import statistics
import time

import torch


def main() -> dict:
    import galore_torch

    from ftstudy.fastpath import galore_8bit_step

    original = galore_torch.GaLoreAdamW8bit.step
    assert original is not galore_8bit_step, "run in a fresh process: the class is already patched"
    shapes = [(1024, 1152), (256, 1152), (1152, 1024), (6912, 1152), (1152, 6912)]
    torch.manual_seed(0)
    init = [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes]
    norm0 = torch.ones(1152, device="cuda", dtype=torch.bfloat16)
    copies = []
    for _ in range(2):
        ws = [torch.nn.Parameter(w.clone()) for w in init]
        norm = torch.nn.Parameter(norm0.clone())
        opt = galore_torch.GaLoreAdamW8bit([{"params": [norm]}, {"params": ws, "rank": 128, "update_proj_gap": 2,
                                            "scale": 0.25, "proj_type": "std"}], lr=1e-3, weight_decay=0.01)
        copies.append((ws + [norm], opt))
    times = {"galore_torch": [], "project": []}
    moved = {"galore_torch": 0, "project": 0}
    for step in range(8):
        grads = [torch.randn_like(p) * 0.01 for p in copies[0][0]]
        for (params, opt), name, fn in zip(copies, times, (original, galore_8bit_step), strict=True):
            ptrs = [p.data_ptr() for p in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(opt)
            torch.cuda.synchronize()
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
            moved[name] += sum(p.data_ptr() != q for p, q in zip(params, ptrs, strict=True))
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(copies[0][0], copies[1][0], strict=True))
    change = max((a.float() - w.float()).abs().max().item() for a, w in zip(copies[0][0], init + [norm0], strict=True))
    rec = {"max_abs_diff": diff, "max_abs_change": change, "weights_moved": moved,
           "step_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
