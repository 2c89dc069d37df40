"""Time the pipeline stage by stage as `dvc repro` runs it, and extrapolate to the full study from the rates.

    python benchmarks/pipeline.py --profile study_random --out pipeline_h200.json   # on a GPU
    python benchmarks/pipeline.py --stages train_qlora evaluate@qlora --force       # some stages again

``--profile`` composes params.yaml from conf/ for that profile first, as `dvc exp run -S profile=...` does (it
rewrites params.yaml in the working tree; `git checkout params.yaml` restores the committed one); ``--set KEY=VALUE``
adds overrides to it, as `-S` does (e.g. ``--set model.random.tokenizer_dir=/path`` on a machine without the
GGUF package).

Each stage runs as `dvc repro --single-item <stage>` in dvc.yaml's order, timed from outside. A stage DVC finds
up to date is recorded as skipped. Timings go to a log as each stage ends (``--log``, kept where git ignores it),
so a run that must be spread over several calls (a lent GPU runs one command for at most 10 minutes) continues
where the last call stopped: ``--budget-s`` stops before a stage once that many seconds have passed.

The extrapolation to the study reads the full profile (conf/profile/full.yaml): its steps per method, rates per
sweep, test prompts and new tokens, and scales what each stage measured: a training by its steady tokens/s (the
hybrid's QLoRA phase at train_qlora's, its GaLore phase at its own) plus its one-off costs (the first step,
compiling and recording each batch shape, GaLore's projections repeated at the study's projection interval, a
checkpoint every save_steps of the study) plus the stage's load and save time; a sweep as that many runs of its method's
training, each with the load and validation it measured; generation by its seconds scaled by the prompts x new
tokens (an upper bound; 1 where the profile evaluates the study's prompts, as study_random does); the re-rank
likewise. Data stages and the report are taken as measured. ``study_s`` is the study as the seeds define it
(four trainings, five evaluations, the re-rank), ``study_with_sweeps_s`` adds the learning-rate sweeps. A training
at its sweep's winning rate copies the sweep's run (ftstudy/checkpoints.py, RunStore): it counts as trained (with
the load, validation and save its sweep measured a run) in ``study_s``, and as the copy it was after the sweeps.

The generated rows are short (~54 Gemma tokens), while most of the hub datasets' batches hold a row that fills
max_seq_len, so every row of such a batch is padded to it. ``--full-rows FILE`` (benchmarks/train_methods.py
--full-rows: every row max_seq_len tokens) gives a second estimate of the trainings and sweeps at those rates,
``*_full_rows``: what the study costs when every batch is padded to max_seq_len.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftstudy.atomic import read_json, write_json  # noqa: E402
from ftstudy.params import Params, default_params, load_params  # noqa: E402

TRAINED = {"train_qlora": "qlora", "train_lora_wide": "lora_wide", "train_galore": "galore",
           "train_sequential_ensemble": "sequential_ensemble"}


def stage_names() -> list[str]:
    """dvc.yaml's stages in file order, matrix stages expanded (the order dvc.yaml lists is a topological one)."""
    out = subprocess.run(["dvc", "stage", "list", "--name-only"], check=True, capture_output=True, text=True).stdout
    return out.split()


def run_stage(name: str, force: bool) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", "--single-item", *(["--force"] if force else []), name],
                          capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 2)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"stage {name} failed (exit {proc.returncode})")
    return {"stage": name, "wall_s": seconds, "ran": f"Running stage '{name}'" in proc.stdout,
            "copied": "copied, not trained again" in proc.stdout}  # a training that is its sweep's run


def write_params(profile: str, overrides: list[str], out: Path) -> None:
    """params.yaml of ``profile`` and ``overrides``, written as `dvc exp run -S profile=... -S ...` writes it."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, os.fspath(ROOT / "conf"), None, "config", "", [f"profile={profile}", *overrides])


def run_seconds(m: dict, steps: int, gap: int | None, rate: dict | None = None, save_steps: int = 0) -> float:
    """One training run of ``steps`` optimizer steps at the steady rate ``m`` (a training's metrics) measured, plus
    its one-off costs: the first step, compiling and recording each batch shape, GaLore's projections every ``gap``
    steps, a checkpoint every ``save_steps`` (each at its measured cost; none measured, none counted).
    ``rate``: the steady rate and tokens per step of another measurement instead (every row max_seq_len tokens:
    benchmarks/train_methods.py --full-rows; the hybrid's from its phases)."""
    r = m if rate is None else rate
    tokens_per_s, per_step = r["steady_tokens_per_s"], r["trained_tokens"] / r["steps"]
    once, counts = m.get("one_off_seconds", {}), m.get("one_off_steps", {})
    def each(cost):  # the measured seconds of one such step
        return once.get(cost, 0.0) / counts[cost] if counts.get(cost) else 0.0

    fixed = sum(v for k, v in once.items() if k not in ("projection", "checkpoint"))
    recurring = each("projection") * (steps // gap if gap else 0) + each("checkpoint") * (steps // save_steps if save_steps else 0)
    return fixed + recurring + steps * per_step / tokens_per_s


def hybrid_rate(records: dict[str, dict], qlora_fraction: float) -> dict | None:
    """The hybrid's rate from its phases' methods measured apart: QLoRA's steps for ``qlora_fraction`` of the
    budget, GaLore's for the rest (None unless both were measured)."""
    if not {"qlora", "galore"} <= records.keys():
        return None

    def step_s(r):
        return r["trained_tokens"] / r["steps"] / r["steady_tokens_per_s"]

    tokens = records["galore"]["trained_tokens"] / records["galore"]["steps"]
    seconds = qlora_fraction * step_s(records["qlora"]) + (1 - qlora_fraction) * step_s(records["galore"])
    return {"steady_tokens_per_s": tokens / seconds, "trained_tokens": tokens, "steps": 1}


def metrics_path(stage: str) -> str | None:
    """Where a stage writes its metrics; None for a stage that writes none."""
    if stage in TRAINED:
        return f"metrics/train/{TRAINED[stage]}.json"
    if stage.startswith("sweep_"):
        return f"metrics/sweep/{stage.removeprefix('sweep_')}.json"
    if stage.startswith("evaluate@"):
        return f"metrics/eval/{stage.split('@')[1]}.json"
    return "metrics/eval/rerank.json" if stage == "evaluate_rerank" else None


def stage_metrics(name: str) -> dict[str, dict]:
    """The metrics a stage wrote, by path, read as it ends. They go into the log: a lent machine gets the working
    tree again at every call, committed metrics included, so a run spread over several calls would otherwise read
    the committed files in place of what its earlier calls measured."""
    path = metrics_path(name)
    return {path: read_json(path)} if path and Path(path).exists() else {}


def extrapolate(timings: dict[str, dict], measured: Params, study: Params, full_rows: dict[str, dict],
                written: dict[str, dict] | None = None) -> dict:
    """Each stage's time at the study's size, from what it measured here. ``full_rows``: per method, a training
    on rows of max_seq_len tokens, for a second estimate of the trainings and sweeps (``study_s_full_rows``).
    ``written``: metrics by path as the stages wrote them (the log's); a path missing there is read from disk."""
    def load(path: str | None) -> dict | None:
        return (written or {}).get(path) or (read_json(path) if path and Path(path).exists() else None)

    steps = study.train.max_steps  # one budget for every method; the hybrid's two phases share it
    gaps = {m: getattr(study, f"train_{m}").update_proj_gap for m in ("galore", "sequential_ensemble")}
    prompts = study.data.test_per_source * len(study.data.sources)
    measured_prompts = measured.data.test_per_source * len(measured.data.sources)
    rows = {}
    for name, t in timings.items():
        row = {"measured_wall_s": t["wall_s"]}
        method = TRAINED.get(name) or (name.removeprefix("sweep_") if name.startswith("sweep_") else None)
        m = (load(metrics_path(f"train_{method}")) if method else None) or {}
        if m.get("steady_tokens_per_s"):
            own, first_phase = None, 0.0
            if method == "sequential_ensemble" and (q := load(metrics_path("train_qlora"))):
                # The hybrid's metrics hold its GaLore phase's rate and one-off costs; its QLoRA phase steps at
                # train_qlora's rate, and what that phase took beyond its steps is a one-off cost too.
                own = hybrid_rate({"qlora": q, "galore": m}, study.train_sequential_ensemble.qlora_fraction)
                p0 = m["phases"][0]
                first_phase = max(0.0, p0["train_seconds"] - p0["steps"] * q["trained_tokens"] / q["steps"]
                                  / q["steady_tokens_per_s"])
            run = {"": first_phase + run_seconds(m, steps, gaps.get(method), own, study.train.save_steps)}
            if full_rows.get(method):
                run["_full_rows"] = first_phase + run_seconds(m, steps, gaps.get(method), full_rows[method],
                                                              study.train.save_steps)
            if name in TRAINED:  # the stage's loading, validation loss and saving as measured, once
                row.update(tokens_per_s=m["steady_tokens_per_s"], tokens_per_step=round(m["trained_tokens"] / m["steps"], 1),
                           peak_memory_gb=m["peak_memory_gb"], study_steps=steps, seconds=m.get("seconds"),
                           one_off_seconds=m.get("one_off_seconds"), one_off_steps=m.get("one_off_steps"))
                overhead = t["wall_s"] - m["train_seconds"]
                if t.get("copied") and (s := timings.get(f"sweep_{method}")) and (sw := load(metrics_path(f"sweep_{method}"))):
                    # The stage copied its sweep's run: the seeds' study (no sweep) trains it, with the load,
                    # validation and save that sweep's runs took; after the sweeps it is the copy as measured.
                    overhead = (s["wall_s"] - sum(r["train_seconds"] for r in sw["grid"])) / len(sw["grid"])
                    row.update(copied_from_sweep=True, with_sweeps_s=t["wall_s"])
                row.update({f"study_s{k}": round(overhead + v, 1) for k, v in run.items()})
            elif sweep := load(metrics_path(name)):  # a run per rate: each loads, trains, validates
                grid = sweep["grid"]
                rates = len(getattr(study.sweep, method))
                per_run = (t["wall_s"] - sum(r["train_seconds"] for r in grid)) / len(grid)
                row.update(study_rates=rates, study_steps=steps)
                row.update({f"study_s{k}": round(rates * (per_run + v), 1) for k, v in run.items()})
        elif name.startswith("evaluate@") and (e := load(metrics_path(name))):
            g = e["generation"]
            scale = prompts / measured_prompts * study.evaluate.max_new_tokens / measured.evaluate.max_new_tokens
            row.update(generated_tokens_per_s=g["generated_tokens_per_s"], generate_seconds=g["generate_seconds"],
                       seconds=g.get("seconds"), study_generated_tokens=prompts * study.evaluate.max_new_tokens,
                       study_s=round(t["wall_s"] - g["generate_seconds"] + g["generate_seconds"] * scale, 1))
        elif name == "evaluate_rerank" and (e := load(metrics_path(name))):
            g = e["generation"]
            scale = prompts / measured_prompts * study.rerank.k / measured.rerank.k
            row.update(seconds=g.get("seconds"),
                       study_s=round(t["wall_s"] - g["generate_seconds"] + g["generate_seconds"] * scale, 1))
        rows[name] = row
    return rows


def totals(rows: dict[str, dict]) -> dict:
    """The study as the seeds define it (trainings, evaluations, re-rank, data, report) and with the learning-rate
    sweeps; each also with the trainings and sweeps at their full-row rates where those were given."""
    def total(stages, key, with_sweeps=False):
        return round(sum(r["with_sweeps_s"] if with_sweeps and "with_sweeps_s" in r
                         else r.get(key, r.get("study_s", r["measured_wall_s"])) for r in stages), 1)

    seeds = [r for n, r in rows.items() if not n.startswith("sweep_")]
    out = {"study_s": total(seeds, "study_s"), "study_with_sweeps_s": total(rows.values(), "study_s", True)}
    if any("study_s_full_rows" in r for r in rows.values()):
        out.update(study_s_full_rows=total(seeds, "study_s_full_rows"),
                   study_with_sweeps_s_full_rows=total(rows.values(), "study_s_full_rows", True))
    minutes = {k: (k.replace("_s_full_rows", "_minutes_full_rows") if k.endswith("_full_rows")
                   else k.removesuffix("_s") + "_minutes") for k in out}
    return {**out, **{minutes[k]: round(v / 60, 1) for k, v in out.items()}}


def machine() -> dict:
    """Where stages run: the GPU and the packages, written into each stage's log record, so that an extrapolation
    made later elsewhere (e.g. with --full-rows on a laptop) still names the machine that measured."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "versions": {name: installed(name)
                         for name in ("torch", "transformers", "peft", "bitsandbytes", "galore-torch", "dvc")}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="compose params.yaml for this profile first (e.g. study_random)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides, with --profile")
    parser.add_argument("--stages", nargs="+", help="these stages only (default: all, in dvc.yaml's order)")
    parser.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no stage once this many seconds have passed (continue in the next call)")
    parser.add_argument("--log", type=Path, default=Path(".pipeline/timings.jsonl"))
    parser.add_argument("--full-rows", type=Path, metavar="JSON",
                        help="benchmarks/train_methods.py --full-rows output: also estimate the trainings at its rates")
    parser.add_argument("--fill-from", type=Path, metavar="JSON",
                        help="an earlier result of this script: stages missing from the log are not run but taken "
                             "from it (listed under filled_from), for a run whose machine was lost before the end")
    parser.add_argument("--note", default="", help="how the run was made, added to the result's note")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.set and not args.profile:
        parser.error("--set needs --profile (it composes params.yaml)")
    if args.profile:
        write_params(args.profile, args.set, ROOT / "params.yaml")
    wanted = args.stages or stage_names()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.log.exists():
        done = {r["stage"]: r for r in map(json.loads, args.log.read_text().splitlines())}
    earlier = read_json(args.fill_from)["stages"] if args.fill_from else {}
    filled = [n for n in wanted if n not in done] if args.fill_from else []
    if unknown := [n for n in filled if n not in earlier]:
        raise SystemExit(f"--fill-from {args.fill_from} has no {', '.join(unknown)}: run those stages")
    start, here = time.perf_counter(), machine()
    for name in wanted:
        if name in done or name in filled:
            continue
        if time.perf_counter() - start > args.budget_s:
            print(f"budget spent: stopping before {name}; run again to continue", flush=True)
            return {}
        rec = {**run_stage(name, args.force), **here}
        if rec["ran"]:
            rec["metrics"] = stage_metrics(name)
        done[name] = rec
        with args.log.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "metrics"}), flush=True)
    measured = load_params()
    study = default_params("full")
    full_rows = {}
    if args.full_rows:
        got = read_json(args.full_rows)
        records = got["records"] if isinstance(got, dict) else got  # train_methods.py writes a list
        full_rows = {r["method"]: r for r in records if r.get("steady_tokens_per_s")}
        full_rows.setdefault("sequential_ensemble", hybrid_rate(full_rows, study.train_sequential_ensemble.qlora_fraction))
    written = {path: m for rec in done.values() for path, m in rec.get("metrics", {}).items()}
    rows = extrapolate({n: done[n] for n in wanted if n in done}, measured, study, full_rows, written)
    rows = {n: rows[n] if n in rows else {**earlier[n], "filled_from": str(args.fill_from)} for n in wanted}
    wanted = [n for n in wanted if n in done]
    measured_on = next((done[n] for n in wanted if done[n]["ran"] and "versions" in done[n]), here)
    ran = [n for n in wanted if done[n]["ran"]]
    result = {
        "profile": measured.profile, "model_source": measured.model.source,
        "gpu": measured_on["gpu"], "versions": measured_on["versions"],
        "command": " ".join(["python", *(a for i, a in enumerate(sys.argv)  # the note goes in the note
                                         if "--note" not in (a, sys.argv[i - 1] if i else ""))]),
        "note": "measured on this profile; study_s extrapolates each stage to the full profile's steps, prompts and "
                "new tokens from the measured rates (generation: its seconds scaled by prompts x new tokens, an upper "
                "bound); the sweeps to the full profile's rates per method. *_full_rows: the trainings at the rates "
                f"of {args.full_rows} (every row max_seq_len tokens) instead of this profile's rows"
                + (f". {args.note}" if args.note else ""),
        "stages": rows,
        "measured_wall_s": round(sum(done[n]["wall_s"] for n in wanted), 1),
        "skipped": [n for n in wanted if not done[n]["ran"]],
        "filled_from": {"file": str(args.fill_from), "stages": filled} if filled else None,
        **totals(rows),
    }
    print(f"\n{'stage':30} {'measured s':>11} {'study s':>9}" + ("  full rows" if full_rows else ""))
    for n in rows:
        r = rows[n]
        print(f"{n:30} {r['measured_wall_s']:>11.1f} {r.get('study_s', r['measured_wall_s']):>9.1f}"
              + (f" {r['study_s_full_rows']:>10.1f}" if "study_s_full_rows" in r else "")
              + ("" if n in ran else f"  (from {args.fill_from})" if n in filled else "  (up to date: skipped)"))
    print(f"the study: {result['study_minutes']} min; with the learning-rate sweeps: "
          f"{result['study_with_sweeps_minutes']} min" + (
              f" (full rows: {result['study_minutes_full_rows']} / {result['study_with_sweeps_minutes_full_rows']})"
              if full_rows else ""))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
