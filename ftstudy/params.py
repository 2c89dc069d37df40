"""One typed schema for params.yaml, validated before any stage does real work.

Every stage calls :func:`load_params` first. Unknown keys, wrong types and out-of-range values are
collected and reported together in one :class:`ParamsError`, each with its dotted key, the value
found and what is allowed, so a user with three mistakes learns of all three in one run.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HELDOUT_DIR = Path("data/heldout")  # evaluate.extra_test_sets live here; every evaluation depends on the folder

SOURCES = ("alpaca", "tulu", "ultrachat")
MODEL_SOURCES = ("gguf", "hub", "random", "tiny_random")
ARCH_NAMES = ("gemma-3-1b",)  # ftstudy.arch.ARCHS (imported lazily there; kept in step by a test)
DATA_SOURCES = ("synthetic", "hub")
MULTI_TURN_POLICIES = ("last_turn", "first_turn")
STORAGE_DTYPES = ("float32", "bfloat16")
EMBEDDED_HINT = (
    "The offline embedded default needs no network: use `model.source: gguf` and "
    "`data.source: synthetic` (e.g. `dvc exp run -S profile=embedded`)."
)


class ParamsError(ValueError):
    """params.yaml is invalid; the message lists every problem found."""


def _spec(*, ge=None, le=None, gt=None, lt=None, choices=None, subset=None, rates=False, doc=""):
    """A dataclass field carrying its validation rule, so the schema and its checks live side by side. No default:
    every value comes from params.yaml, whose defaults live in one place, conf/ (see :func:`default_params`)."""
    meta = {"ge": ge, "le": le, "gt": gt, "lt": lt, "choices": choices, "subset": subset, "rates": rates, "doc": doc}
    return field(metadata=meta)


@dataclass(frozen=True)
class TinyModelParams:
    """A random-weight Gemma 3 of toy size with a small BPE tokenizer: tests and the micro profile."""

    seed: int = _spec(ge=0, doc="weight init; kept apart from the top-level seed so a seed sweep reuses the model")
    vocab_size: int = _spec(ge=64, le=262144)
    hidden_size: int = _spec(ge=8)
    intermediate_size: int = _spec(ge=8)
    num_hidden_layers: int = _spec(ge=1)
    num_attention_heads: int = _spec(ge=1)
    num_key_value_heads: int = _spec(ge=1)
    head_dim: int = _spec(ge=4)


@dataclass(frozen=True)
class RandomModelParams:
    """A real architecture with random weights: the study's compute and memory where no weights can be fetched."""

    arch: str = _spec(choices=ARCH_NAMES)
    seed: int = _spec(ge=0, doc="weight init")
    tokenizer_dir: str = _spec(doc="a saved tokenizer to use; empty = Gemma 3's, from model.gguf_package")


@dataclass(frozen=True)
class ModelParams:
    source: str = _spec(choices=MODEL_SOURCES)
    hub_id: str = _spec()
    hub_revision: str = _spec()
    gguf_package: str = _spec()
    storage_dtype: str = _spec(choices=STORAGE_DTYPES)
    tiny: TinyModelParams
    random: RandomModelParams


@dataclass(frozen=True)
class DataParams:
    seed: int = _spec(ge=0, doc="the data's own seed: generation, the hub pools' shuffle, subsample, split and the "
                                "training file's order; held apart from the training seed, so every seed "
                                "experiment is scored on the same test items")
    source: str = _spec(choices=DATA_SOURCES)
    sources: list = _spec(subset=SOURCES)
    hub_revision: str = _spec()
    pool_per_source: int = _spec(ge=1, doc="raw rows fetched or generated per source and split")
    train_per_source: int = _spec(ge=1)
    val_per_source: int = _spec(ge=1, doc="validation rows carved from the training pool (never the test set): the "
                                          "teacher-forced loss that settings are chosen on")
    test_per_source: int = _spec(ge=1)
    multi_turn: str = _spec(choices=MULTI_TURN_POLICIES)
    max_chars: int = _spec(ge=16, doc="rows with a longer field are skipped as too_long")


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
GALORE_OPTIMIZERS = ("galore_adamw", "galore_adamw_layerwise", "galore_adamw_8bit", "galore_adamw_8bit_layerwise")
FASTPATH_SETTINGS = ("auto", "on", "off")
STRATEGIES = ("ddp", "fsdp")
FULL_PARAMETER_OPTIMIZERS = (*GALORE_OPTIMIZERS, "adamw_torch")


@dataclass(frozen=True)
class TrainParams:
    """Shared by every method, so methods differ only in what their own sections say."""

    max_seq_len: int = _spec(ge=16, le=32768)
    max_prompt_tokens: int = _spec(ge=8)
    max_steps: int = _spec(ge=1, doc="the training budget: optimizer steps every method trains (the same examples "
                                     "and tokens for all); the hybrid splits it between its two phases")
    batch_size: int = _spec(ge=1)
    grad_accum: int = _spec(ge=1)
    warmup_steps: int = _spec(ge=0)
    lr_scheduler: str = _spec(choices=LR_SCHEDULERS)
    weight_decay: float = _spec(ge=0)
    max_grad_norm: float = _spec(gt=0)
    save_steps: int = _spec(ge=1, doc="checkpoint interval; an interrupted run resumes from the last one")
    logging_steps: int = _spec(ge=1, doc="steps per point of the loss curve (the mean loss over them); on a GPU each "
                                         "point makes the host wait for the GPU, so long runs log every few steps")
    gradient_checkpointing: bool = _spec(doc="recompute each decoder layer's activations in the backward")
    keep_activations: int = _spec(ge=0, doc="with gradient_checkpointing: the last N decoder layers keep their "
                                               "activations (no recompute: faster, more memory)")
    packing: bool = _spec(doc="padding-free batches: examples share rows of max_seq_len, attention kept within each example")
    kernels: str = _spec(choices=FASTPATH_SETTINGS, doc="Liger's Triton kernels; auto = on with CUDA, uncompiled layers")
    compile: str = _spec(choices=FASTPATH_SETTINGS, doc="torch.compile each decoder layer; auto = on with CUDA")
    cuda_graphs: str = _spec(choices=FASTPATH_SETTINGS, doc="replay the compiled layers as CUDA graphs "
                             "(torch.compile reduce-overhead); auto = on wherever layers are compiled")
    memory_budget_gb: float = _spec(ge=0, doc="GPU memory a training may use, in GB of 2^30 bytes as CUDA counts "
                                             "them (per device; above the card's: the "
                                             "card's); > 0 measures the model and picks the micro-batch and the layers "
                                             "kept uncheckpointed that fit it (ftstudy.budget), overriding "
                                             "gradient_checkpointing and keep_activations; 0 = off")
    num_processes: int = _spec(ge=1, le=64, doc="workers (GPUs) per machine for a training stage; >1 launches it "
                                               "through torchrun")
    nnodes: int = _spec(ge=1, le=1024, doc="machines a training stage spans, each with num_processes workers; > 1 "
                                          "needs rdzv_endpoint, and each machine's rank in FTSTUDY_NODE_RANK")
    rdzv_endpoint: str = _spec(doc="host:port of machine 0, where the workers meet (nnodes > 1); empty = one machine")
    strategy: str = _spec(choices=STRATEGIES, doc="data parallelism with num_processes > 1: ddp or fsdp")

    @property
    def world(self) -> int:
        """Training processes over all machines; train.batch_size is split among them."""
        return self.num_processes * self.nnodes

    @property
    def fsdp(self) -> bool:
        """Whether the stages shard with FSDP (the strategy matters only with several processes)."""
        return self.world > 1 and self.strategy == "fsdp"


@dataclass(frozen=True)
class LoraParams:
    lora_r: int = _spec(ge=1, le=4096)
    lora_alpha: int = _spec(ge=1)
    lora_dropout: float = _spec(ge=0, le=0.9)
    target_modules: list = _spec(subset=LINEAR_NAMES)
    learning_rate: float = _spec(gt=0, le=1)


@dataclass(frozen=True)
class GaloreParams:
    optimizer: str = _spec(choices=FULL_PARAMETER_OPTIMIZERS,
                           doc="a GaLore optimizer; adamw_torch = full-parameter training without GaLore (FSDP)")
    rank: int = _spec(ge=1)
    update_proj_gap: int = _spec(ge=1)
    scale: float = _spec(gt=0)
    target_modules: list = _spec(subset=("self_attn", "mlp"))
    learning_rate: float = _spec(gt=0, le=1)


@dataclass(frozen=True)
class HybridParams(GaloreParams):
    """The sequential hybrid's GaLore phase; its QLoRA phase trains with train_qlora's settings."""

    qlora_fraction: float = _spec(gt=0, lt=1, doc="share of train.max_steps its QLoRA phase takes; the GaLore phase "
                                                  "the rest, continuing the same stream of examples")


@dataclass(frozen=True)
class SweepParams:
    """Learning rates tried per method (stage sweep@<method>), each at the training budget, scored by the
    validation loss; the lowest is the rate to configure in the method's section (REPORT.md flags one that is not)."""

    seed: int = _spec(ge=0, doc="the training seed of every swept run: rates are chosen once and held fixed "
                                "across seed experiments, so `-S seed=N` reruns no sweep")
    qlora: list = _spec(rates=True)
    lora_wide: list = _spec(rates=True)
    galore: list = _spec(rates=True)
    sequential_ensemble: list = _spec(rates=True, doc="its GaLore phase's rate; the QLoRA phase keeps train_qlora's")


MODELS = ("base", "qlora", "lora_wide", "galore", "sequential_ensemble")


@dataclass(frozen=True)
class EvaluateParams:
    max_new_tokens: int = _spec(ge=1, le=4096)
    batch_size: int = _spec(ge=1)
    batch_tokens: int = _spec(ge=0, doc="cap on rows x prompt width per generation batch; 0 = no cap")
    max_prompt_tokens: int = _spec(ge=8)
    showcase_prompts: list = _spec(doc="the seeds' three showcase prompts, asked of every model")
    extra_test_sets: list = _spec(doc="JSONL files under data/heldout/ outside the training distribution, each "
                                      "answered and scored by every model (ftstudy.heldout)")


@dataclass(frozen=True)
class RerankParams:
    """Seed 004's ensemble: ``proposer`` samples k candidates, ``scorer`` keeps the most likely one."""

    proposer: str = _spec(choices=MODELS)
    scorer: str = _spec(choices=MODELS)
    k: int = _spec(ge=1, le=64)
    temperature: float = _spec(gt=0, le=5)
    top_p: float = _spec(gt=0, le=1)


@dataclass(frozen=True)
class ReportParams:
    n_samples: int = _spec(ge=0, le=100)
    bootstrap_resamples: int = _spec(ge=100, le=100000)
    confidence: float = _spec(gt=0.5, lt=1)


@dataclass(frozen=True)
class UiParams:
    """How stages show their progress. No stage lists these keys, so changing them reruns nothing."""

    progress_bar: bool = _spec(doc="tqdm bars while training and generating")


@dataclass(frozen=True)
class Params:
    profile: str = _spec(doc="label written into every metrics file and the report")
    seed: int = _spec(ge=0, doc="the training seed: adapter init, dropout, the order examples are taken in, the "
                                "re-rank's sampling; data.seed fixes the data")
    model: ModelParams
    data: DataParams
    train: TrainParams
    train_qlora: LoraParams
    train_lora_wide: LoraParams
    train_galore: GaloreParams
    train_sequential_ensemble: HybridParams
    sweep: SweepParams
    evaluate: EvaluateParams
    rerank: RerankParams
    report: ReportParams
    ui: UiParams

    @property
    def hybrid_steps(self) -> tuple[int, int]:
        """Steps of the hybrid's QLoRA phase and of its GaLore phase: train.max_steps between them."""
        qlora = round(self.train.max_steps * self.train_sequential_ensemble.qlora_fraction)
        return qlora, self.train.max_steps - qlora


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


UNKNOWN_KEY_HINTS = {
    "max_steps": ". The methods share one budget, train.max_steps (the hybrid splits it with "
                 "train_sequential_ensemble.qlora_fraction): steps per method would compare unequal budgets",
}


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'params.yaml'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(
                f"{prefix}{key}: unknown key; allowed keys here: {', '.join(sorted(fields))}" + UNKNOWN_KEY_HINTS.get(key, "")
            )
    values = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in raw:
            problems.append(f"{dotted}: missing; every key is required (conf/config.yaml has each one with its "
                            f"default: compose params.yaml from conf/, e.g. with `dvc exp run`)")
            continue
        value = raw[name]
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, dotted + ".", problems)
            continue
        if tp is float and isinstance(value, str):
            value = _yaml_float(value)  # YAML 1.1 reads `2e-4` (no dot) as a string
        if _check_value(dotted, value, tp, f.metadata, problems):
            values[name] = float(value) if tp is float else value
    return cls(**values) if len(values) == len(fields) else None


def _yaml_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _check_value(dotted: str, value: Any, tp, meta, problems: list[str]) -> bool:
    # bool is an int subclass in Python: reject it explicitly where an int is expected.
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{dotted}: expected an integer, got {value!r}")
        return False
    if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        problems.append(f"{dotted}: expected a number, got {value!r}")
        return False
    if tp in (str, bool, list) and not isinstance(value, tp):
        problems.append(f"{dotted}: expected {_type_name(tp)}, got {value!r}")
        return False
    if tp is list and meta.get("rates"):
        rates = [_yaml_float(v) if isinstance(v, str) else v for v in value]
        if (not rates or len(set(rates)) != len(rates)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in rates)):
            problems.append(f"{dotted}: expected a non-empty list of distinct learning rates in (0, 1], got {value!r}")
            return False
        return True
    if tp is list and meta.get("subset") is None and not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(f"{dotted}: expected a list of non-empty strings, got {value!r}")
        return False
    bounds = []
    if meta.get("ge") is not None and value < meta["ge"]:
        bounds.append(f">= {meta['ge']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        bounds.append(f"> {meta['gt']}")
    if meta.get("le") is not None and value > meta["le"]:
        bounds.append(f"<= {meta['le']}")
    if meta.get("lt") is not None and value >= meta["lt"]:
        bounds.append(f"< {meta['lt']}")
    if bounds:
        rng = [f">= {meta['ge']}" if meta.get("ge") is not None else None,
               f"> {meta['gt']}" if meta.get("gt") is not None else None,
               f"<= {meta['le']}" if meta.get("le") is not None else None,
               f"< {meta['lt']}" if meta.get("lt") is not None else None]
        problems.append(f"{dotted}: {value!r} is out of range; allowed: {' and '.join(r for r in rng if r)}")
        return False
    if meta.get("choices") and value not in meta["choices"]:
        problems.append(f"{dotted}: {value!r} is not allowed; allowed values: {', '.join(meta['choices'])}")
        return False
    if meta.get("subset") is not None:
        bad = [v for v in value if v not in meta["subset"]]
        if bad or not value or len(set(value)) != len(value):
            what = f"unknown {bad!r}" if bad else ("empty list" if not value else "duplicates")
            problems.append(
                f"{dotted}: {what}; allowed: a non-empty list of distinct values from {', '.join(meta['subset'])}"
            )
            return False
    return True


def _cross_checks(p: Params, problems: list[str]) -> None:
    d = p.data
    sets = [Path(x) for x in p.evaluate.extra_test_sets]
    outside = [str(x) for x in sets if x.parent != HELDOUT_DIR or x.suffix != ".jsonl"]
    if outside:
        problems.append(f"evaluate.extra_test_sets: {outside} are not .jsonl files directly in {HELDOUT_DIR}/, the "
                        f"folder every evaluation depends on; allowed: {HELDOUT_DIR}/<name>.jsonl (move the file there)")
    if len({x.stem for x in sets}) != len(sets):
        problems.append(f"evaluate.extra_test_sets: {[str(x) for x in sets]} repeat a file name; each set is named "
                        "by its file name, so give each a different one")
    if d.source == "synthetic" and d.train_per_source + d.val_per_source + d.test_per_source > d.pool_per_source:
        problems.append(
            f"data.train_per_source + data.val_per_source + data.test_per_source: {d.train_per_source} + "
            f"{d.val_per_source} + {d.test_per_source} exceeds data.pool_per_source ({d.pool_per_source}), the rows "
            f"generated per source; allowed: a sum <= data.pool_per_source (raise the pool or lower the counts)"
        )
    qlora_steps, _ = p.hybrid_steps
    if not 1 <= qlora_steps < p.train.max_steps:
        problems.append(
            f"train_sequential_ensemble.qlora_fraction: {p.train_sequential_ensemble.qlora_fraction} of "
            f"train.max_steps={p.train.max_steps} gives the hybrid's QLoRA phase {qlora_steps} steps and its GaLore "
            f"phase {p.train.max_steps - qlora_steps}; allowed: a fraction that leaves each phase >= 1 step "
            f"(or a larger train.max_steps)"
        )
    for name in ("train_galore", "train_sequential_ensemble"):
        g = getattr(p, name)
        if g.optimizer.endswith("_layerwise") and p.train.grad_accum != 1:
            problems.append(
                f"{name}.optimizer={g.optimizer} with train.grad_accum={p.train.grad_accum}: layer-wise GaLore "
                f"updates each layer during backward and cannot accumulate gradients; allowed: train.grad_accum: 1, "
                f"or a non-layerwise optimizer (galore_adamw, galore_adamw_8bit)"
            )
    if p.rerank.proposer == "base" or p.rerank.scorer == "base" or p.rerank.proposer == p.rerank.scorer:
        problems.append(f"rerank.proposer / rerank.scorer: {p.rerank.proposer!r} / {p.rerank.scorer!r}; allowed: two "
                        f"different trained methods from {', '.join(MODELS[1:])}")
    if p.train.keep_activations and not p.train.gradient_checkpointing:
        problems.append(f"train.keep_activations: {p.train.keep_activations} chooses layers exempt from gradient "
                        f"checkpointing, which is off; allowed: 0, or train.gradient_checkpointing: true")
    if p.train.cuda_graphs == "on" and p.train.grad_accum > 1:
        problems.append(f"train.cuda_graphs: on with train.grad_accum={p.train.grad_accum}: gradients accumulated "
                        f"over micro-steps would sit in CUDA-graph memory that the next replay overwrites; allowed: "
                        f"auto (off with accumulation) or off, or train.grad_accum: 1 with a larger batch_size")
    if p.train.cuda_graphs == "on" and (p.train.compile == "off" or p.train.fsdp):
        problems.append("train.cuda_graphs: on replays compiled layers, but "
                        + ("train.compile is off" if p.train.compile == "off" else "FSDP runs uncompiled layers")
                        + "; allowed: auto or off, or train.compile: on/auto with one process or DDP")
    if p.train.memory_budget_gb and p.train.fsdp:
        problems.append("train.memory_budget_gb: FSDP shards and checkpoints itself, which the plan does not model; "
                        "allowed: 0 with train.strategy: fsdp, or strategy: ddp")
    if p.train.keep_activations and p.train.fsdp:
        problems.append("train.keep_activations: FSDP checkpoints every layer itself; allowed: 0 with "
                        "train.strategy: fsdp")
    if p.train.nnodes > 1 and not re.fullmatch(r"[^\s:]+:\d{1,5}", p.train.rdzv_endpoint):
        problems.append(f"train.rdzv_endpoint: {p.train.rdzv_endpoint!r} with train.nnodes={p.train.nnodes}; "
                        f"allowed: host:port of machine 0 that every machine can reach (e.g. 10.0.0.1:29500)")
    if p.train.nnodes == 1 and p.train.rdzv_endpoint:
        problems.append(f"train.rdzv_endpoint: {p.train.rdzv_endpoint!r} is for several machines, but train.nnodes "
                        f"is 1; allowed: '' (one machine), or train.nnodes > 1")
    if p.train.max_prompt_tokens >= p.train.max_seq_len:
        problems.append(f"train.max_prompt_tokens: {p.train.max_prompt_tokens} must be < train.max_seq_len "
                        f"({p.train.max_seq_len}) to leave room for the response")
    if p.model.source == "tiny_random":
        t = p.model.tiny
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(
                f"model.tiny.num_key_value_heads: {t.num_key_value_heads} must divide "
                f"model.tiny.num_attention_heads ({t.num_attention_heads})"
            )


def parse_params(raw: dict) -> Params:
    """Build and validate :class:`Params` from a mapping; raise one ParamsError listing every problem."""
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if not problems:
        _cross_checks(params, problems)
    if problems:
        raise ParamsError("invalid params.yaml:\n  - " + "\n  - ".join(problems))
    return params


CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(profile: str = "embedded", conf_dir: Path = CONF) -> dict:
    """params.yaml's content for ``profile``: conf/config.yaml with conf/profile/<profile>.yaml merged over it,
    as Hydra composes it for `dvc exp run -S profile=...` (tests/test_params.py checks they agree)."""
    raw = yaml.safe_load((conf_dir / "config.yaml").read_text())
    raw.pop("defaults", None)
    path = conf_dir / "profile" / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (conf_dir / "profile").glob("*.yaml"))
        raise ParamsError(f"profile {profile!r}: no {path}; allowed: {', '.join(known)}")
    _merge(raw, yaml.safe_load(path.read_text()) or {})
    return raw


def _merge(into: dict, over: dict) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def default_params(profile: str = "embedded", **sections: dict) -> Params:
    """The params of ``profile`` as conf/ defines them, with ``sections`` (e.g. ``train={"batch_size": 4}``)
    merged over them and the whole validated: how tests and benchmarks build params, from the one place that
    holds every default."""
    raw = compose(profile)
    _merge(raw, sections)
    return parse_params(raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run stages from the repository root")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    return parse_params(raw)


def to_dict(params) -> dict:
    return dataclasses.asdict(params)
