"""End to end: `dvc repro` on the micro profile in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("models/", "data/", "metrics/", "REPORT.md", "dvc.lock", ".params_valid", ".dvc/cache", ".dvc/tmp")

pytestmark = pytest.mark.slow
METHODS = ["qlora", "lora_wide", "galore", "sequential_ensemble"]
ALL_STAGES = {"validate_params", "fetch_model", "fetch_data", "preprocess", "report"} | {
    f"train_{m}" for m in METHODS} | {f"evaluate@{m}" for m in ["base", *METHODS]}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for rel in files:
        if rel.startswith(SKIP) or not (ROOT / rel).is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)


def _run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _ran(stdout: str) -> list[str]:
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory):
    from dvc.utils.hydra import compose_and_dump

    repo = tmp_path_factory.mktemp("repo")
    _copy_repo(repo)
    compose_and_dump(repo / "params.yaml", os.fspath(repo / "conf"), None, "config", "", ["profile=micro"])
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], repo, env)  # as a clone has
    first = _run(["dvc", "repro"], repo, env)
    return repo, env, first.stdout


def test_repro_runs_the_whole_dag(micro_repo):
    repo, env, stdout = micro_repo
    ran = _ran(stdout)
    assert set(ran) == ALL_STAGES and ran[0] == "validate_params" and ran[-1] == "report"
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    flat = json.dumps(metrics)
    for key in ("bleu4_corpus_0_100", "rouge_l_f1_0_1", "per_source", "ultrachat", "alpaca", "tulu"):
        assert key in flat
    report = (repo / "REPORT.md").read_text()
    assert "Profile `micro`: NOT the Gemma-3-1b study" in report and "| base |" in report
    edges = _dag_edges(_run(["dvc", "dag", "--md"], repo, env).stdout)
    for edge in [("fetch_model", "preprocess"), ("fetch_data", "preprocess"), ("preprocess", "evaluate@base"),
                 ("evaluate@base", "report"), ("validate_params", "fetch_model")]:
        assert edge in edges


def _dag_edges(mermaid: str) -> set[tuple[str, str]]:
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', mermaid))
    return {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", mermaid)}


def test_second_repro_does_nothing(micro_repo):
    repo, env, _ = micro_repo
    out = _run(["dvc", "repro"], repo, env).stdout
    assert _ran(out) == []
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo, env).stdout


def test_changing_an_eval_param_reruns_only_evaluate_and_report(micro_repo):
    repo, env, _ = micro_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env).stdout
    assert set(_ran(out)) == {"validate_params", "report"} | {f"evaluate@{m}" for m in ["base", *METHODS]}


def test_changing_a_qlora_param_reruns_only_qlora_and_what_consumes_it(micro_repo):
    repo, env, _ = micro_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_qlora"]["lora_r"] += 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env).stdout
    assert set(_ran(out)) == {"validate_params", "train_qlora", "train_sequential_ensemble", "evaluate@qlora",
                              "evaluate@sequential_ensemble", "report"}
    trained = json.loads((repo / "metrics/train/qlora.json").read_text())
    assert trained["optimizer"] == "adamw_torch" and trained["steps"] == params["train_qlora"]["max_steps"]


def test_a_bad_param_fails_first_with_a_clear_message(micro_repo):
    repo, env, _ = micro_repo
    good = (repo / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["data"]["sources"] = ["alpaca", "dolly"]
    params["evaluate"]["max_new_tokenz"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = _run(["dvc", "repro"], repo, env, check=False)
    finally:
        (repo / "params.yaml").write_text(good)
    assert proc.returncode != 0
    assert _ran(proc.stdout) == ["validate_params"]
    assert "data.sources: unknown ['dolly']" in proc.stderr
    assert "evaluate.max_new_tokenz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
