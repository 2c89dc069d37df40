"""Run every method's real training code for a few steps on a random-weight model; print cost per method.

    python benchmarks/train_methods.py --arch gemma-3-1b --steps 6 --out results.json   # on a GPU
    python benchmarks/train_methods.py --arch tiny --steps 2                            # CPU smoke run
    python benchmarks/train_methods.py --full-rows --gradient-checkpointing --steps 24 --methods qlora galore \
        --trace 16 20                        # rows like speed.py's, and where a step's time goes (GPU)

The weights are random (no pretrained weights reach the GPU machine), which does not change compute or
memory. Each method goes through ftstudy.training.train, the same path the DVC stages use, with the
optimizer a user of that device would get: 8-bit layer-wise GaLore on CUDA, its CPU variant otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speed import end_trace, start_trace  # noqa: E402

from ftstudy import synthetic  # noqa: E402
from ftstudy.arch import GEMMA3_1B  # noqa: E402
from ftstudy.atomic import write_json, write_jsonl  # noqa: E402
from ftstudy.methods import METHODS  # noqa: E402
from ftstudy.models import tiny_config, train_tiny_tokenizer  # noqa: E402
from ftstudy.params import FULL_PARAMETER_OPTIMIZERS, default_params  # noqa: E402
from ftstudy.prompt import IGNORE_INDEX  # noqa: E402
from ftstudy.sources import convert_rows  # noqa: E402
from ftstudy.training import train_method  # noqa: E402


def build_base(arch: str, out: Path) -> None:
    """A random-weight base checkpoint with a small BPE tokenizer (its ids are valid in any vocabulary)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tokenizer = train_tiny_tokenizer(512, seed=0)
    if arch == "gemma-3-1b":
        config = Gemma3TextConfig(**GEMMA3_1B)
    else:
        config = tiny_config(default_params().model.tiny, len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_json(out / "fetch_info.json", {"source": f"random-{arch}"})


def write_train_data(path: Path, per_source: int = 400, join: int = 1, rows: int | None = None) -> None:
    """The project's generated instruction rows, all three sources, as the training stages read them.

    ``join`` > 1 merges that many consecutive rows into one (instructions joined, responses joined): the
    generated rows are short (~33 tokens here), and throughput is measured on rows as long as real ones.
    ``rows`` cycles through the result to exactly that many rows.
    """
    recs = []
    for source, splits in synthetic.RAW_SPLITS.items():
        recs += list(convert_rows(source, synthetic.generate(source, splits[0], per_source, 0), 10**6, "last_turn"))
    if join > 1:
        recs = [{**group[0], "id": f"joined-{i}", "input": "", "history": [],
                 "instruction": " ".join(r["instruction"] + (" " + r["input"] if r["input"] else "") for r in group),
                 "response": " ".join(r["response"] for r in group)}
                for i, group in enumerate(recs[j:j + join] for j in range(0, len(recs) - join + 1, join))]
    if rows is not None:  # exactly ``rows`` rows, cycling through the generated ones
        recs = [{**recs[i % len(recs)], "id": f"row-{i}"} for i in range(rows)]
    write_jsonl(path, recs)


def _row_shape(base_dir: Path, train_path: Path, p) -> dict:
    """Tokens per training example and the labelled share, as the training stages tokenize them."""
    from ftstudy.atomic import read_jsonl
    from ftstudy.batches import tokenize_dataset
    from ftstudy.models import load_tokenizer

    rows = tokenize_dataset(load_tokenizer(base_dir), read_jsonl(train_path)[:256], p.train.max_seq_len,
                            p.train.max_prompt_tokens)
    lengths = [len(r["input_ids"]) for r in rows]
    labelled = sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows)
    return {"mean_tokens": round(sum(lengths) / len(lengths), 1), "min_tokens": min(lengths),
            "max_tokens": max(lengths), "labelled_fraction": round(labelled / sum(lengths), 3)}


def _trace_trainer(first: int, last: int, out: Path) -> None:
    """Profile steps first..last of every train() call: the stages' Trainer with one callback more."""
    import time

    from transformers import TrainerCallback

    from ftstudy import training

    base_class = training.completion_trainer_class

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.prof, self.t0 = start_trace(torch.cuda.is_available()), time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == last + 1 and hasattr(self, "prof"):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                summary, tables = end_trace(self.prof, last - first + 1, time.perf_counter() - self.t0,
                                            torch.cuda.is_available())
                print(tables, flush=True)
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / "last.json", {"steps": [first, last], **summary})
                del self.prof

    def traced():
        cls = base_class()

        class Traced(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(Profile())

        return Traced

    training.completion_trainer_class = traced


def _record_gradients(log: list[dict]) -> None:
    """Every optimizer step of layer-wise GaLore: each weight's gradient norm as its hook receives it (before any
    update), the step's batch shape and, named, the five largest: where a gradient norm that explodes comes from.
    Waits for the GPU at every weight: a diagnosis, not a timing."""
    from ftstudy import galore, trainer

    init, hook, step, loss = (galore.LayerwiseGaLore.__init__, galore.LayerwiseGaLore._hook,
                              galore.LayerwiseGaLore.step, trainer.completion_loss)
    seen = {"shape": None}

    def named_init(self, model, *a, **k):
        init(self, model, *a, **k)
        self.names, self.norms = {id(p): n for n, p in model.named_parameters()}, {}

    def recording_hook(self, p):
        if p.grad is not None:
            self.norms[self.names[id(p)]] = float(torch.linalg.vector_norm(p.grad, dtype=torch.float32))
        hook(self, p)

    def recording_step(self, closure=None):
        norms = self.norms
        total = sum(v * v for v in norms.values()) ** 0.5
        log.append({"shape": seen["shape"], "grad_norm": round(total, 4),
                    "largest": {n: round(v, 4) for n, v in sorted(norms.items(), key=lambda kv: -kv[1])[:5]}})
        self.norms = {}
        return step(self, closure)

    def shape_loss(model, input_ids, *a, **k):
        seen["shape"] = list(input_ids.shape)
        return loss(model, input_ids, *a, **k)

    galore.LayerwiseGaLore.__init__, galore.LayerwiseGaLore._hook = named_init, recording_hook
    galore.LayerwiseGaLore.step, trainer.completion_loss = recording_step, shape_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gemma-3-1b", "tiny"], default="gemma-3-1b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seq-len", type=int, default=512, help="train.max_seq_len (rows are packed to it)")
    parser.add_argument("--join", type=int, default=1,
                        help="generated rows joined into one example (~33 tokens each): 1 = short instruction rows")
    parser.add_argument("--full-rows", action="store_true",
                        help="every example exactly --seq-len tokens, its second half labelled: speed.py's rows "
                             "(--prompt-frac 0.5), so tokens/s compare directly")
    parser.add_argument("--trace", nargs=2, type=int, metavar=("FIRST", "LAST"),
                        help="profile optimizer steps FIRST..LAST of each method: GPU kernel time per step against "
                             "wall time, and the costliest operations")
    parser.add_argument("--grad-norms", action="store_true",
                        help="layer-wise GaLore: record every step's gradient norms by weight (slow: a diagnosis)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0, help="train.memory_budget_gb (GPU)")
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="train.logging_steps (the full profile's 10: a logged loss makes the host wait for the GPU)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="train.compile")
    parser.add_argument("--cuda-graphs", choices=["auto", "off"], default="auto", help="train.cuda_graphs (with compile)")
    parser.add_argument("--galore-optimizer", choices=FULL_PARAMETER_OPTIMIZERS,
                        help="GaLore's and the hybrid's optimizer (default: the 8-bit layer-wise one on a GPU, the "
                             "32-bit one on a CPU)")
    parser.add_argument("--lora-dropout", type=float,
                        help="the LoRA methods' dropout (default: the profile's; speed.py trains with 0)")
    parser.add_argument("--galore-lr", type=float, help="GaLore's and the hybrid's learning rate (default: the embedded "
                        "profile's, tuned for the 270M model)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()

    work = Path(tempfile.mkdtemp(prefix="train_methods_"))
    build_base(args.arch, work / "models" / "base")
    join, max_prompt = args.join, args.seq_len * 3 // 4
    if args.full_rows:  # ~33 tokens a generated row: 48 joined overflow both halves, which truncation evens out
        join, max_prompt = max(join, 48), args.seq_len // 2
    write_train_data(work / "train.jsonl", join=join)
    if args.trace:
        _trace_trainer(*args.trace, work / "traces")
    grad_log: list[dict] = []
    if args.grad_norms:
        _record_gradients(grad_log)

    p = default_params()
    galore_opt = args.galore_optimizer or ("galore_adamw_8bit_layerwise" if cuda else "galore_adamw_layerwise")
    galore_lr = {"learning_rate": args.galore_lr} if args.galore_lr is not None else {}
    dropout = {"lora_dropout": args.lora_dropout} if args.lora_dropout is not None else {}
    p = dataclasses.replace(
        p, train=dataclasses.replace(p.train, batch_size=args.batch, save_steps=10**6, warmup_steps=0,
                                     max_seq_len=args.seq_len, compile=args.compile,
                                     cuda_graphs="off" if args.compile == "off" else args.cuda_graphs,
                                     max_prompt_tokens=max_prompt,
                                     gradient_checkpointing=args.gradient_checkpointing, max_steps=args.steps,
                                     memory_budget_gb=args.memory_budget_gb, logging_steps=args.logging_steps),
        train_galore=dataclasses.replace(p.train_galore, optimizer=galore_opt, **galore_lr),
        train_qlora=dataclasses.replace(p.train_qlora, **dropout),
        train_lora_wide=dataclasses.replace(p.train_lora_wide, **dropout),
        train_sequential_ensemble=dataclasses.replace(p.train_sequential_ensemble, optimizer=galore_opt, **galore_lr),
        ui=dataclasses.replace(p.ui, progress_bar=False),
    )
    results = []
    (work / "val.jsonl").write_text("")  # no validation loss: this measures training alone
    for name in [m for m in METHODS if m in args.methods]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # The hybrid trains its QLoRA phase, then its GaLore phase; the record is both (``phases``), the rates the last's.
        m = train_method(name, p, data_dir=work, models_dir=work / "models", ckpt_root=work / "ck", live_dir=None)
        m["arch"] = args.arch
        m["profile"] = f"benchmark: the {p.profile} profile's settings above, random {args.arch} weights, generated rows"
        m["gpu"] = torch.cuda.get_device_name() if cuda else None
        m["rows"] = _row_shape(work / "models" / "base", work / "train.jsonl", p)
        if args.grad_norms:
            m["grad_norms"], grad_log[:] = list(grad_log), []
        if args.trace:
            trace = work / "traces" / "last.json"
            m["trace"] = json.loads(trace.read_text()) if trace.exists() else None
            trace.unlink(missing_ok=True)
        results.append(m)
        print(json.dumps(m), flush=True)

    print(f"\n{'method':20} {'optimizer':28} {'steps':>5} {'tokens/s':>9} {'steady':>9} {'shapes':>6} "
          f"{'peak GB':>8} {'loss':>8}  one-off seconds")
    for m in results:
        print(f"{m['method']:20} {m['optimizer']:28} {m['steps']:>5} {m['tokens_per_s']:>9.0f} "
              f"{m['steady_tokens_per_s'] or float('nan'):>9.0f} {m['batch_shapes']:>6} {m['peak_memory_gb']:>8.2f} "
              f"{m['final_train_loss']:>8.3f}  {m['one_off_seconds']}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    sys.exit(main())
