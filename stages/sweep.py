"""Stage sweep@<method>: the method at every learning rate of sweep.<method>, scored on the validation split."""

import argparse

from ftstudy.atomic import write_json
from ftstudy.errors import run_stage
from ftstudy.methods import METHODS
from ftstudy.params import load_params
from ftstudy.sweep import sweep_method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=METHODS)
    args = parser.parse_args()
    params = load_params()
    result = sweep_method(args.method, params, data_dir="data/processed", base_dir="models/base",
                          work_dir=f"checkpoints/sweep/{args.method}", store_dir="checkpoints/runs")
    write_json(f"metrics/sweep/{args.method}.json", result)
    rows = ", ".join(f"{r['learning_rate']:g}: {r['validation_loss']:.4f}" for r in result["grid"])
    print(f"{args.method}: validation loss by learning rate {rows}; best {result['best_learning_rate']:g}; "
          f"{result['sweep_seconds']} s of training")


if __name__ == "__main__":
    run_stage(main)
