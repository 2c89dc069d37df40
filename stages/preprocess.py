"""Stage preprocess: unified, cleaned, deduplicated train/test JSONL and data statistics (metrics/data.json)."""

from ftstudy.atomic import write_json
from ftstudy.data import preprocess
from ftstudy.errors import run_stage
from ftstudy.models import load_tokenizer
from ftstudy.params import load_params


def main() -> None:
    params = load_params()
    stats = preprocess(params.data, params.data.seed, "data/raw", "data/processed", tokenizer=load_tokenizer("models/base"))
    write_json("metrics/data.json", {"profile": params.profile, **stats})
    print(f"train rows: {stats['train_rows']}, test rows: {stats['test_rows']}")


if __name__ == "__main__":
    run_stage(main)
