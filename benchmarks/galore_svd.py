"""Time GaLore's projection (the SVD of a weight's gradient) on gradient-shaped matrices, per solver.

    python benchmarks/galore_svd.py --out svd.json          # on the GPU

galore-torch computes each projection with a full ``torch.linalg.svd`` of the fp32 gradient. A weight gradient
is a sum of one outer product per token, so a batch of fewer tokens than the weight's smaller side gives a
rank-deficient gradient. This times every solver on full-rank and rank-deficient matrices of Gemma 3 1B's
linear shapes, each case in its own process with a time limit (a stalled solver is reported, not waited for).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"gate/up_proj": (6912, 1152), "down_proj": (1152, 6912), "q_proj": (1024, 1152), "k/v_proj": (256, 1152)}
SOLVERS = ("torch_default", "gesvd", "gesvdj", "gesvda", "ftstudy")


def matrix(shape, rank, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    m, n = shape
    if rank is None:
        return torch.randn(m, n, device="cuda", generator=g)
    return torch.randn(m, rank, device="cuda", generator=g) @ torch.randn(rank, n, device="cuda", generator=g)


def solve(name, a, rank=128):
    if name == "ftstudy":
        from ftstudy.galore import top_singular_vectors

        return top_singular_vectors(a, rank, "right" if a.shape[0] >= a.shape[1] else "left")
    driver = None if name == "torch_default" else name
    return torch.linalg.svd(a, full_matrices=False, driver=driver)


def group(q, rank, name, repeats):
    """Every shape for one solver and gradient rank, each result sent as soon as it is known."""
    for label, shape in SHAPES.items():
        a = matrix(shape, rank)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            solve(name, a)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        q.put((label, times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", default=["full", "256"])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds per solver and rank before the "
                        "shapes not yet done count as stalled")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for r in args.ranks:
        rank = None if r == "full" else int(r)
        for name in args.solvers:
            q = ctx.Queue()
            proc = ctx.Process(target=group, args=(q, rank, name, args.repeats))
            proc.start()
            proc.join(args.timeout)
            stalled = proc.is_alive()
            if stalled:
                proc.kill()
                proc.join()
            done = {}
            while not q.empty():
                label, times = q.get()
                done[label] = times
            for label, shape in SHAPES.items():
                times = done.get(label)
                # the first call pays cuSOLVER's set-up; the median of the rest is the steady cost
                row = {"weight": label, "shape": list(shape), "gradient_rank": r, "solver": name,
                       "seconds": round(statistics.median(times[1:] or times), 4) if times else None,
                       "first_s": round(times[0], 4) if times else None,
                       "stalled_after_s": args.timeout if stalled and times is None else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'weight':14} {'rank':>5} " + " ".join(f"{s:>14}" for s in args.solvers))
    for label in SHAPES:
        for r in args.ranks:
            cells = {x["solver"]: x for x in rows if x["weight"] == label and x["gradient_rank"] == r}
            fmt = [f"{c['seconds']:.4f}" if c["seconds"] is not None else "stalled" for c in (cells[s] for s in args.solvers)]
            print(f"{label:14} {r:>5} " + " ".join(f"{x:>14}" for x in fmt))
    if args.out:
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "timeout_s": args.timeout, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
