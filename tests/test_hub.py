"""The hub path without network fails fast with one message naming the embedded default."""

import socket
import time

import pytest

from ftstudy.data import fetch_data
from ftstudy.hub import HubUnavailable, require_hub
from ftstudy.models import fetch_model
from ftstudy.params import DataParams, ModelParams


def test_offline_flag_fails_immediately(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="model.source: gguf"):
        fetch_model(ModelParams(source="hub"), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_unreachable_endpoint_fails_within_seconds(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="cannot be reached.*data.source: synthetic"):
        fetch_data(DataParams(source="hub"), 0, tmp_path / "raw")
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
