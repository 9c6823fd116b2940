"""Download a model from the Hugging Face hub into results/models/<name>/ (the paper study's models).

The one network step of the model stage: it runs as a job (on a node with internet, or with a warm
HF cache), never at planning time. Only weights in safetensors, the config and the tokenizer files are
fetched (no pickled *.bin, no custom code). FETCHED.json, written last and atomically, records the repo,
the resolved commit and every file with its size, and is what the workflow waits for.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opd.infra import cli
from opd.infra.io import write_json

ALLOW = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer*",
         "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "LICENSE*", "README.md"]


def manifest(repo: str, revision: str, commit: str | None, out_dir: Path) -> dict:
    """What was fetched: repo, requested revision, resolved commit, files with their sizes in bytes."""
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "FETCHED.json"
                   and ".cache" not in p.parts)
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{repo}@{revision}: no *.safetensors weights were fetched into {out_dir} "
                                "(only safetensors are accepted; pickled .bin weights are never loaded)")
    if not (out_dir / "config.json").is_file():
        raise FileNotFoundError(f"{repo}@{revision}: no config.json in {out_dir}")
    return {"repo": repo, "revision": revision, "commit": commit,
            "files": {str(p.relative_to(out_dir)): p.stat().st_size for p in files}}


def write_manifest(info: dict, out_dir: Path) -> Path:
    path = out_dir / "FETCHED.json"
    write_json(path, info, indent=2)
    return path


def fetch(repo: str, revision: str, out_dir: Path) -> dict:
    """snapshot_download of the allowed files; a clear error when the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(out_dir), allow_patterns=ALLOW)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else " (no internet on this node? run the fetch rule on one)"
        raise RuntimeError(f"cannot download {repo}@{revision}{hint}: {err}") from None
    commit = None
    try:
        from huggingface_hub import HfApi

        commit = HfApi().model_info(repo, revision=revision).sha
    except Exception:  # the files are here; the commit is a nicety
        pass
    return manifest(repo, revision, commit, out_dir)


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description="Download a hub model (safetensors only) into a model directory.")
    p.add_argument("--repo", required=True, help="hub id, e.g. Qwen/Qwen3-1.7B")
    p.add_argument("--revision", default="main", help="branch, tag or commit to fetch (pin a commit for a study)")
    p.add_argument("--out-dir", type=Path, required=True, help="model directory to fill")
    p.add_argument("--name", required=True, help="name of the model in the study")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    args = cli.parse(p, argv, {"repo": "models.*.hub", "revision": "models.*.revision"})
    from opd.infra import tracking

    with tracking.run(args.study, f"fetch[{args.name}]", params=vars(args)) as run:
        info = fetch(args.repo, args.revision, args.out_dir)
        run.log_metrics({"bytes": float(sum(info["files"].values())), "files": float(len(info["files"]))})
        path = write_manifest(info, args.out_dir)
    print(path.read_text())


if __name__ == "__main__":
    cli.run(main)
