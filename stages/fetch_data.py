"""Stage fetch_data: raw rows of each source, in its own hub schema, into data/raw."""

from ftstudy.data import fetch_data
from ftstudy.errors import run_stage
from ftstudy.params import load_params


def main() -> None:
    params = load_params()
    info = fetch_data(params.data, params.data.seed, "data/raw")
    for source, entry in info["datasets"].items():
        print(f"{source}: {entry['splits']}")


if __name__ == "__main__":
    run_stage(main)
