"""The hub path without network fails fast with one message naming the embedded default."""

import socket
import time

import pytest
import torch

from ftstudy.data import fetch_data
from ftstudy.hub import HubUnavailable, require_hub
from ftstudy.models import fetch_model
from ftstudy.params import default_params


def test_offline_flag_fails_immediately(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="model.source: gguf"):
        fetch_model(default_params(model=dict(source="hub")).model, tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_unreachable_endpoint_fails_within_seconds(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="cannot be reached.*data.source: synthetic"):
        fetch_data(default_params(data=dict(source="hub")).data, 0, tmp_path / "raw")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "raw").exists()


def test_blackholed_dns_times_out(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("ftstudy.hub.PROBE_SECONDS", 0.5)
    monkeypatch.setattr("ftstudy.hub._connect", lambda host, port: time.sleep(3))
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="timed out"):
        require_hub("test")
    assert time.monotonic() - start < 5


def test_random_source_builds_the_architecture_with_random_weights_and_the_given_tokenizer(
        monkeypatch, tmp_path, tiny_model_dir):
    """model.source=random: the named architecture's config, seeded random weights, a saved tokenizer; no download."""
    import json

    from safetensors.torch import load_file

    from ftstudy import arch
    small = dict(arch.GEMMA3_1B, vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, head_dim=16, layer_types=["sliding_attention", "full_attention"])
    monkeypatch.setitem(arch.ARCHS, "gemma-3-1b", small)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = default_params(model=dict(source="random", storage_dtype="float32",
                                  random=dict(tokenizer_dir=str(tiny_model_dir)))).model
    info = fetch_model(p, tmp_path / "a")
    assert "NOT a pretrained model" in info["model_id"] and info["arch"] == "gemma-3-1b"
    config = json.loads((tmp_path / "a/config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 2, 1024)
    assert (tmp_path / "a/tokenizer_config.json").exists()
    fetch_model(p, tmp_path / "b")  # the seed makes it reproducible: the same weights again
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_source_with_a_folder_without_tokenizer_is_a_clear_error(tmp_path):
    from ftstudy.errors import UserError

    p = default_params(model=dict(source="random", random=dict(tokenizer_dir=str(tmp_path)))).model
    with pytest.raises(UserError, match="holds no saved tokenizer"):
        fetch_model(p, tmp_path / "base")
    assert not (tmp_path / "base").exists()
