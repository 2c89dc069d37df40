"""Stage train_<method>: one training path for every method (see ftstudy/training.py)."""

import argparse
import sys

import torch

from ftstudy import distributed
from ftstudy.atomic import write_json
from ftstudy.errors import run_stage
from ftstudy.methods import METHODS, method_spec
from ftstudy.params import load_params
from ftstudy.training import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=METHODS)
    args = parser.parse_args()
    params = load_params()
    spec = method_spec(params, args.method)
    if distributed.needs_launch(params.train.num_processes):
        distributed.check(spec, params.train, torch.cuda.is_available())  # fail here, not in N workers
        sys.exit(distributed.launch(__file__, [args.method], params.train.num_processes))
    m = train(spec, params, train_path="data/processed/train.jsonl", models_dir="models",
              out_dir=f"models/{spec.name}", ckpt_dir=f"checkpoints/{spec.name}", live_dir=f"dvclive/{spec.name}")
    if m is None:
        return  # a worker other than the main one: it wrote nothing
    write_json(f"metrics/train/{spec.name}.json", m)
    print(f"{spec.name}: {m['steps']} steps in {m['train_seconds']} s, {m['tokens_per_s']} tokens/s, "
          f"peak {m['peak_memory_gb']} GB ({m['peak_memory_kind']}) on each of {m['num_processes']} device(s), "
          f"final loss {m['final_train_loss']}")


if __name__ == "__main__":
    run_stage(main)
