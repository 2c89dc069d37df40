"""End to end: `dvc repro` on the micro profile in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("models/", "data/", "metrics/", "REPORT.md", "dvc.lock", ".params_valid", ".dvc/cache", ".dvc/tmp")

pytestmark = pytest.mark.slow
FAKE_TOKEN = "hf_" + uuid.uuid4().hex  # made at run time: it can be in no file unless something leaked it
METHODS = ["qlora", "lora_wide", "galore", "sequential_ensemble"]
ALL_STAGES = {"validate_params", "fetch_model", "fetch_data", "preprocess", "evaluate_rerank", "report"} | {
    f"train_{m}" for m in METHODS} | {f"sweep_{m}" for m in METHODS} | {f"evaluate@{m}" for m in ["base", *METHODS]}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for rel in files:
        # data/ holds outputs, except the tracked inputs: the held-out sets and the seed records' folder (not the
        # records: they belong to the embedded profile's params)
        if (rel.startswith(SKIP) and not rel.startswith(("data/heldout/", "data/seeds/README"))) or not (ROOT / rel).is_file():
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
    # Every process of the run (dvc and each stage) loads tests/netblock/sitecustomize.py: network use is blocked
    # and logged. A fake HF token is in the environment; neither may leave a trace.
    netlog = repo.parent / "netblock.log"
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests/netblock"), os.environ.get("PYTHONPATH")])),
               FTSTUDY_NETBLOCK_LOG=str(netlog), HF_TOKEN=FAKE_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_TOKEN)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], repo, env)  # as a clone has
    first = _run(["dvc", "repro"], repo, env)
    attempts = netlog.read_text() if netlog.exists() else ""
    (repo.parent / "attempts_during_repro.log").write_text(attempts)
    # The guard is really loaded in subprocesses: a probe gets blocked and logged.
    _run([sys.executable, "-c", "import socket; socket.create_connection(('example.org', 443), 1)"], repo, env, check=False)
    assert "example.org" in netlog.read_text()
    return repo, env, first.stdout


def test_the_embedded_pipeline_touches_no_network(micro_repo):
    repo, _, _ = micro_repo
    assert (repo.parent / "attempts_during_repro.log").read_text() == ""


def test_the_token_appears_in_no_output(micro_repo):
    repo, env, stdout = micro_repo
    assert FAKE_TOKEN not in stdout
    for path in repo.rglob("*"):
        if path.is_file() and ".git/" not in str(path) and path.stat().st_size < 50_000_000:
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


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


def test_a_fresh_clone_pulls_every_output_from_the_default_remote_and_has_nothing_to_rerun(micro_repo):
    """The reviewer's path: the author runs and pushes to the default remote (a folder beside the repository);
    a fresh clone pulls, and DVC finds every stage up to date (no work file such as a checkpoint is needed)."""
    repo, env, _ = micro_repo
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo, env).stdout
    _run(["dvc", "push"], repo, env)
    assert any((repo.parent / "ftstudy-dvc-remote").rglob("*")), "the default remote is ../ftstudy-dvc-remote"
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run", "--allow-empty"], repo, env)
    clone = repo.parent / "clone"  # beside the original, so the default remote is the same folder
    _run(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    _run(["dvc", "pull"], clone, env)
    assert (clone / "models/qlora/adapter_model.safetensors").exists() and (clone / "data/predictions/rerank.jsonl").exists()
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], clone, env).stdout
    assert _ran(_run(["dvc", "repro", "--dry"], clone, env).stdout) == []


def test_a_one_param_change_shows_in_the_diffs_and_the_review_as_that_param_and_its_methods_metrics(micro_repo, tmp_path):
    """The reviewer's view of a pull request that changes GaLore's learning rate: `dvc params diff` names that one
    param, `dvc metrics diff` shows GaLore's metrics (and those of what consumes its model) and no other method's,
    and scripts/review.sh puts both in Markdown."""
    src, env, _ = micro_repo
    repo = tmp_path / "repo"
    shutil.copytree(src, repo, symlinks=True)

    def commit(message):
        _run(["git", "add", "-A"], repo, env)
        _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"], repo, env)
        return _run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()

    before = commit("run")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_galore"]["learning_rate"] *= 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], repo, env)
    after = commit("galore lr x3")
    changed_params = json.loads(_run(["dvc", "params", "diff", before, after, "--json"], repo, env).stdout)
    assert list(changed_params) == ["params.yaml"] and list(changed_params["params.yaml"]) == ["train_galore.learning_rate"]
    metrics = json.loads(_run(["dvc", "metrics", "diff", before, after, "--json"], repo, env).stdout)
    changed = {path for path, diff in metrics.items() if diff}
    assert "metrics/train/galore.json" in changed
    assert changed <= {"metrics/train/galore.json", "metrics/eval/galore.json", "metrics/eval/rerank.json",
                       "metrics/report.json"}, changed  # the scorer of the re-rank is GaLore
    review = _run(["bash", "scripts/review.sh", before, str(tmp_path / "plots")], repo, env).stdout
    assert "train_galore.learning_rate" in review and "metrics/train/galore.json" in review
    assert "validation_loss" in review and "qlora.json" not in review and "lora_wide.json" not in review
    assert (tmp_path / "plots/index.html").exists()


def test_changing_the_budget_reruns_every_training_and_what_follows_but_not_the_data(micro_repo):
    repo, env, _ = micro_repo
    assert _dry_run_with(repo, env, "train", "max_steps", 2) == {"validate_params", *(f"train_{m}" for m in METHODS),
                                                                 *(f"sweep_{m}" for m in METHODS),
                                                                 *(f"evaluate@{m}" for m in METHODS),
                                                                 "evaluate_rerank", "report"}


def test_a_seed_experiment_retrains_and_reevaluates_but_reruns_no_data_sweep_or_base(micro_repo):
    """`dvc exp run -S seed=N` (what the seed aggregate is built from) costs the trainings and their evaluations:
    the data (data.seed), the learning-rate sweeps (sweep.seed) and the base's answers are shared by every seed."""
    repo, env, _ = micro_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["seed"] += 1
    assert _dry_run_after(repo, env, "params.yaml", yaml.safe_dump(params, sort_keys=False)) == {
        "validate_params", *(f"train_{m}" for m in METHODS), *(f"evaluate@{m}" for m in METHODS),
        "evaluate_rerank", "report"}


def test_the_sweep_grid_reruns_its_sweep_only_and_the_chosen_rate_reruns_no_sweep(micro_repo):
    """Changing a method's grid reruns its sweep and the report; setting its learning rate to the sweep's winner
    retrains the method, not the sweep."""
    repo, env, _ = micro_repo
    good = (repo / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["sweep"]["galore"] = params["sweep"]["galore"] + [3.0e-3]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert set(_ran(_run(["dvc", "repro", "--dry"], repo, env).stdout)) == {"validate_params", "sweep_galore"}
    finally:
        (repo / "params.yaml").write_text(good)
    assert "sweep_galore" not in _dry_run_with(repo, env, "train_galore", "learning_rate", 1e-4)
    sweep = json.loads((repo / "metrics/sweep/galore.json").read_text())
    assert [r["learning_rate"] for r in sweep["grid"]] == params["sweep"]["galore"][:-1]
    assert all(r["validation_loss"] > 0 for r in sweep["grid"])
    assert sweep["best_learning_rate"] == min(sweep["grid"], key=lambda r: r["validation_loss"])["learning_rate"]


def _dry_run_with(repo, env, section, key, delta) -> set[str]:
    """The stages `dvc repro` would run after changing one param, without running them."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] += delta
    return _dry_run_after(repo, env, "params.yaml", yaml.safe_dump(params, sort_keys=False))


def _dry_run_after(repo, env, rel: str, text: str) -> set[str]:
    """The stages `dvc repro` would run with ``rel`` holding ``text``, without running them (``rel`` is restored).

    ``dvc repro --dry`` lists the stages whose own deps or params changed; everything downstream of those
    in the DAG reruns too once their outputs change.
    """
    good = (repo / rel).read_text()
    (repo / rel).write_text(text)
    try:
        direct = set(_ran(_run(["dvc", "repro", "--dry"], repo, env).stdout))
    finally:
        (repo / rel).write_text(good)
    edges = _dag_edges(_run(["dvc", "dag", "--md"], repo, env).stdout)
    affected = set(direct - {"validate_params"})  # its stamp never changes, so it reruns nothing by itself
    while True:
        more = {b for a, b in edges if a in affected} - affected
        if not more:
            return affected | direct
        affected |= more


def test_changing_an_eval_param_reruns_only_evaluate_and_report(micro_repo):
    repo, env, _ = micro_repo
    expected = {"validate_params", "evaluate_rerank", "report"} | {f"evaluate@{m}" for m in ["base", *METHODS]}
    assert set(_dry_run_with(repo, env, "evaluate", "max_new_tokens", 1)) == expected


def test_editing_an_extra_test_set_reruns_only_the_evaluations_and_report(micro_repo):
    """The out-of-distribution sets are a dependency of the evaluations, not of training or the re-rank; the
    evaluations wrote their rows and the report shows the forgetting table."""
    repo, env, _ = micro_repo
    rel = "data/heldout/open_instructions.jsonl"
    text = (repo / rel).read_text() + json.dumps({"instruction": "Name a colour.", "input": "", "response": "Red."}) + "\n"
    assert _dry_run_after(repo, env, rel, text) == {f"evaluate@{m}" for m in ["base", *METHODS]} | {"report"}
    n = len((repo / rel).read_text().splitlines())
    extra = json.loads((repo / "metrics/eval/galore.json").read_text())["extra_test_sets"]["open_instructions"]
    assert extra["n"] == n and extra["mean_reference_loss"] > 0
    rows = (repo / "data/predictions/extra/base/open_instructions.jsonl").read_text().splitlines()
    assert len(rows) == n and "reference_loss" in json.loads(rows[0])
    report = (repo / "REPORT.md").read_text()
    assert "## Outside the training distribution: `open_instructions`" in report
    assert "### In-domain gain next to the change on `open_instructions`" in report


def test_changing_a_qlora_param_reruns_only_qlora_and_what_consumes_it(micro_repo):
    repo, env, _ = micro_repo
    assert set(_dry_run_with(repo, env, "train_qlora", "lora_r", 4)) == {
        "validate_params", "train_qlora", "train_sequential_ensemble", "sweep_qlora", "sweep_sequential_ensemble",
        "evaluate@qlora",
        "evaluate@sequential_ensemble", "evaluate_rerank", "report"}
    trained = json.loads((repo / "metrics/train/qlora.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert trained["optimizer"] == "adamw_torch" and trained["steps"] == params["train"]["max_steps"]


def test_every_cached_output_is_stored_once(micro_repo):
    """Outputs are hard links to their copy in the DVC cache (cache.type: hardlink first), not a second copy."""
    repo, _, _ = micro_repo
    cached = [repo / "models/base/model.safetensors", repo / "data/processed/train.jsonl",
              repo / "data/predictions/qlora.jsonl"]
    assert all(f.stat().st_nlink >= 2 for f in cached), [(f.name, f.stat().st_nlink) for f in cached]  # 3+: equal files


def test_toggling_the_progress_bar_reruns_no_stage(micro_repo):
    """A cosmetic setting is in no stage's params nor in a training checkpoint's fingerprint."""
    repo, env, _ = micro_repo
    good = (repo / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["ui"]["progress_bar"] = not params["ui"]["progress_bar"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _run(["dvc", "repro"], repo, env).stdout
    finally:
        (repo / "params.yaml").write_text(good)
        _run(["dvc", "repro", "validate_params"], repo, env)  # the lock back to the committed params
    assert _ran(out) == ["validate_params"]  # checks the file; its stamp is constant, so nothing follows


def test_a_killed_evaluations_journal_changes_no_stage(micro_repo):
    """An evaluation killed mid-run leaves its journal (the finished batches) for the rerun to resume from; it
    lives outside every folder a stage depends on or writes, so DVC sees no change."""
    from ftstudy.evaluate import journal_path

    repo, env, _ = micro_repo
    journal = journal_path("data/predictions/qlora.jsonl")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    paths = {str(d) for st in stages.values() for d in st.get("deps", [])}
    paths |= {next(iter(o)) if isinstance(o, dict) else o for st in stages.values() for o in st.get("outs", [])}
    assert not any(journal.is_relative_to(p.replace("${item.model}", "qlora")) for p in paths)
    (repo / journal).parent.mkdir(parents=True, exist_ok=True)
    (repo / journal).write_text('{"batch": 0, "fingerprint": "a killed run"}\n')
    try:
        # the report depends on data/predictions, where the journal used to live
        assert "up to date" in _run(["dvc", "status", "report", "evaluate@qlora"], repo, env).stdout
    finally:
        (repo / journal).unlink()


def test_changing_rerank_k_reruns_only_the_rerank_evaluation_and_report(micro_repo):
    repo, env, _ = micro_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rerank"]["k"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env).stdout
    assert set(_ran(out)) == {"validate_params", "evaluate_rerank", "report"}
    rows = [json.loads(line) for line in (repo / "data/predictions/rerank.jsonl").read_text().splitlines()]
    assert all(len(r["candidates"]) == params["rerank"]["k"] for r in rows)


def test_the_report_has_intervals_figures_showcase_and_plots(micro_repo):
    repo, env, _ = micro_repo
    report = (repo / "REPORT.md").read_text()
    for text in ("95 % paired-bootstrap", "### Method vs method", "## What the numbers show",
                 "Explain quantum computing to a 10-year-old.", "| rerank |", "reports/training_loss.png",
                 "exact match (0-1) [95 % CI]", "### Exact match per source and task family", "| task family |",
                 "budget: steps / examples / tokens", "(2 adamw_torch + 2 galore_adamw_layerwise)", "**Equal budgets**",
                 "### Learning rates chosen on validation data", "validation loss by learning rate"):
        assert text in report
    accuracy = json.loads((repo / "metrics/eval/qlora.json").read_text())["accuracy"]  # generated data: answers
    assert set(accuracy["per_source"]) == {"alpaca", "tulu", "ultrachat"} and accuracy["overall"]["n"] > 0
    assert sum(a["n"] for a in accuracy["per_family"].values()) == accuracy["overall"]["n"]
    for png in ("training_loss", "quality_vs_memory", "quality_vs_time", "rouge_per_source", "bleu_per_source"):
        assert (repo / f"reports/{png}.png").read_bytes()[:4] == b"\x89PNG"
    _run(["dvc", "plots", "show", "-o", "plots_html"], repo, env)
    assert (repo / "plots_html/index.html").exists()


def test_seed_records_with_the_workspaces_params_are_aggregated_in_the_report(micro_repo):
    """Records of two more training seeds (made here from the run's own, with scores moved) give the report its
    aggregate over three seeds; a record made with other params is named and left out."""
    from ftstudy import seeds
    from ftstudy.params import load_params, to_dict
    from ftstudy.report import MODEL_ORDER, build_report

    repo, _, _ = micro_repo
    params = load_params(repo / "params.yaml")
    own = seeds.run_record(lambda rel: (repo / rel).read_text() if (repo / rel).exists() else None,
                           to_dict(params), MODEL_ORDER, params.evaluate.extra_test_sets)
    folder = repo / seeds.FOLDER
    try:
        for k, seed in enumerate((params.seed + 1, params.seed + 2, params.seed + 3)):
            rec = json.loads(json.dumps(own))
            rec["seed"] = seed
            for m in rec["models"].values():
                m["rouge_l"] = [min(1.0, v + 0.01 * (k + 1)) for v in m["rouge_l"]]
            if k == 2:
                rec["params"] = {**rec["params"], "train.max_steps": params.train.max_steps + 1}
            (folder / f"seed-{seed}.json").write_text(json.dumps(rec))
        text, significance = build_report(params, repo)
    finally:
        for f in folder.glob("seed-*.json"):
            f.unlink()
    assert "## Across training seeds" in text and f"3 training seeds ({params.seed}, {params.seed + 1}, " in text
    assert f"Records of seeds {params.seed + 3} in `data/seeds/` were made with other params" in text
    agg = significance["seeds"]
    assert agg["seeds"] == [params.seed, params.seed + 1, params.seed + 2]
    assert len(agg["models"]["qlora"]["rouge_l"]["per_seed"]) == 3 and agg["models"]["qlora"]["rouge_l"]["sd"] > 0
    assert "qlora-base" in agg["differences"] and "open_instructions" in agg["extra_test_sets"]
    assert "This report has one training seed" in (repo / "REPORT.md").read_text()  # the stage's own run: one


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


def test_num_processes_makes_dvc_launch_a_training_stage_on_several_workers(micro_repo):
    """`-S train.num_processes=2`: the stage relaunches itself under torchrun; two gloo workers, same effective batch."""
    repo, env, _ = micro_repo
    good = (repo / "params.yaml").read_text()
    single = json.loads((repo / "metrics/train/lora_wide.json").read_text())
    params = yaml.safe_load(good)
    params["train"]["num_processes"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _run(["dvc", "repro", "train_lora_wide"], repo, {**env, "OMP_NUM_THREADS": "1"}).stdout
    finally:
        (repo / "params.yaml").write_text(good)
    assert "train_lora_wide" in _ran(out) and "torch.distributed.run" in out and "--nproc_per_node=2" in out
    multi = json.loads((repo / "metrics/train/lora_wide.json").read_text())
    assert (multi["num_processes"], multi["strategy"], len(multi["per_device"])) == (2, "ddp", 2)
    assert multi["effective_batch"] == single["effective_batch"] == params["train"]["batch_size"]
    assert multi["per_device_batch"] == params["train"]["batch_size"] // 2
    # LoRA dropout draws differ per worker, so only close here; tests/test_distributed.py checks exact curves.
    assert multi["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=0.05)


def test_pipeline_benchmark_times_stages_and_extrapolates_to_the_study(micro_repo):
    """benchmarks/pipeline.py: each stage timed as `dvc repro` runs it, the study's time from the measured rates,
    and a second call continues from the log instead of running anything again."""
    repo, env, _ = micro_repo
    cmd = [sys.executable, "benchmarks/pipeline.py", "--stages", "train_qlora", "evaluate@qlora", "--force",
           "--out", "timings.json"]
    _run(cmd, repo, env)
    got = json.loads((repo / "timings.json").read_text())
    train, evaluate = got["stages"]["train_qlora"], got["stages"]["evaluate@qlora"]
    assert got["profile"] == "micro" and got["skipped"] == []
    assert train["study_steps"] == 3750 and train["tokens_per_s"] > 0
    assert train["study_s"] > train["measured_wall_s"] > 0  # 3,750 steps take longer than the micro profile's 4
    assert evaluate["study_generated_tokens"] == 6000 * 256 and evaluate["study_s"] > evaluate["measured_wall_s"]
    assert got["study_s"] == pytest.approx(train["study_s"] + evaluate["study_s"], abs=0.2)
    trained_at = (repo / "metrics/train/qlora.json").stat().st_mtime_ns
    _run(cmd, repo, env)
    assert (repo / "metrics/train/qlora.json").stat().st_mtime_ns == trained_at  # nothing ran again
    log = [json.loads(line) for line in (repo / ".pipeline/timings.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["versions"]["torch"] and "gpu" in r for r in log)  # the machine that measured
    # The metrics as each stage wrote them: a later call on a lent machine may find the committed files instead.
    assert log[0]["metrics"] == {"metrics/train/qlora.json": json.loads((repo / "metrics/train/qlora.json").read_text())}
    assert got["versions"] == log[0]["versions"] and got["gpu"] == log[0]["gpu"]
    assert json.loads((repo / "timings.json").read_text()) == got


# Imported by nearly every stage as plumbing (params schema, atomic writes, errors, the hub guard, reference shapes,
# the data generator that models' tiny tokenizer trains on, the stopwatch of the timing metrics): neither required as
# deps nor followed.
PLUMBING = {"params", "atomic", "errors", "hub", "arch", "synthetic", "clock", "__init__"}


def _ftstudy_imports(path: Path, seen: set[str]) -> set[str]:
    import ast

    for node in ast.parse(path.read_text()).body:  # module-level imports (a function's own import is not followed)
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftstudy"):
            names = [node.module] + ([f"ftstudy.{a.name}" for a in node.names] if node.module == "ftstudy" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ftstudy.")]
        for name in names:
            mod = name.split(".")[1] if "." in name else None
            if mod and mod not in seen and mod not in PLUMBING and (ROOT / "ftstudy" / f"{mod}.py").exists():
                seen.add(mod)
                _ftstudy_imports(ROOT / "ftstudy" / f"{mod}.py", seen)
    return seen


def test_every_stage_lists_the_library_modules_it_runs_as_deps():
    """Editing a module a stage runs reruns that stage: dvc.yaml's deps name every ftstudy module its script
    imports, directly or through other modules (plumbing aside)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = stage["cmd"].split()[1]
        deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
        used = _ftstudy_imports(ROOT / script, set())
        missing = sorted(f"ftstudy/{m}.py" for m in used if f"ftstudy/{m}.py" not in deps)
        assert not missing, f"stage {name} runs {missing} but does not list them as deps"
