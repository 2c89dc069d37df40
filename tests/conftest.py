"""Shared fixtures: a tiny random Gemma 3 with its small tokenizer, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ftstudy.models import fetch_model
    from ftstudy.params import default_params

    out = tmp_path_factory.mktemp("tiny") / "base"
    fetch_model(default_params(model=dict(source="tiny_random")).model, out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from ftstudy.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from ftstudy.models import load_model

    return load_model(tiny_model_dir)


@pytest.fixture()
def venv_env() -> dict:
    """The environment for subprocesses: this interpreter's bin first, so stage commands' `python` is ours."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
