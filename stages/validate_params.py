"""Stage validate_params: check all of params.yaml against the schema before any other stage runs.

DVC reruns a stage only when a parameter it lists changes, so a misspelt key would otherwise be ignored
silently. This stage tracks the whole file and runs on any change; its stamp's content is constant, so a
passing check never reruns anything downstream by itself: it only orders the check first.
"""

from ftstudy.atomic import write_text
from ftstudy.errors import run_stage
from ftstudy.params import load_params

STAMP = ".params_valid"


def main() -> None:
    load_params()
    write_text(STAMP, "params.yaml passed ftstudy.params validation\n")
    print("params.yaml is valid")


if __name__ == "__main__":
    run_stage(main)
