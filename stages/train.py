"""Stage train_<method>: one training path for every method (see ftstudy/training.py)."""

import argparse
import sys

import torch

from ftstudy import distributed
from ftstudy.atomic import write_json
from ftstudy.checkpoints import RunStore
from ftstudy.errors import run_stage
from ftstudy.methods import METHODS, phases
from ftstudy.params import load_params
from ftstudy.training import train_method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=METHODS)
    args = parser.parse_args()
    params = load_params()
    if distributed.needs_launch(params.train):
        for spec in phases(params, args.method):
            distributed.check(spec, params.train, torch.cuda.is_available())  # fail here, not in N workers
        sys.exit(distributed.launch(__file__, [args.method], params.train))
    m = train_method(args.method, params, data_dir="data/processed", models_dir="models", ckpt_root="checkpoints",
                     live_dir=f"dvclive/{args.method}", store=RunStore("checkpoints/runs", keep=False))
    if m is None:
        return  # a worker other than the main one: it wrote nothing
    write_json(f"metrics/train/{args.method}.json", m)
    print(f"{args.method}: {m['steps']} steps in {m['train_seconds']} s, {m['tokens_per_s']} tokens/s, "
          f"peak {m['peak_memory_gb']} GB ({m['peak_memory_kind']}) on each of {m['num_processes']} device(s), "
          f"final loss {m['final_train_loss']}")


if __name__ == "__main__":
    run_stage(main)
