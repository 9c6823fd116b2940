"""opd.infra.fetch: the manifest of a downloaded model, and a clear error when the hub is out of reach."""

import json

import pytest

from opd.infra import fetch


def test_manifest_lists_files_and_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        fetch.manifest("Qwen/Qwen3-1.7B", "main", None, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    info = fetch.manifest("Qwen/Qwen3-1.7B", "abc", "abc123", tmp_path)
    assert info == {"repo": "Qwen/Qwen3-1.7B", "revision": "abc", "commit": "abc123",
                    "files": {"config.json": 2, "model.safetensors": 10}}
    path = fetch.write_manifest(info, tmp_path)
    assert json.loads(path.read_text())["files"]["model.safetensors"] == 10


def test_offline_download_fails_with_the_repo_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="cannot download Qwen/Qwen3-1.7B@main \\(HF_HUB_OFFLINE is set\\)"):
        fetch.fetch("Qwen/Qwen3-1.7B", "main", tmp_path / "m")
