"""Stage report: REPORT.md from the metrics and predictions, labelled with the profile that produced them."""

from ftstudy.errors import run_stage
from ftstudy.params import load_params
from ftstudy.report import write_report


def main() -> None:
    params = load_params()
    write_report(params, "REPORT.md")
    print("wrote REPORT.md")


if __name__ == "__main__":
    run_stage(main)
