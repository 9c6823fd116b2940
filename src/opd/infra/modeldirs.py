"""Checks against the real models before any job: the directory is there, K fits the tokenizer's vocabulary.

Entry points take local model directories only (hub models are fetched into one by `opd.infra.fetch`, as the
config's `models.<name>.hub` says), so a path that does not exist is reported as a missing directory, never
looked up on the hub (which for a relative path such as `models/x` meant a minute of hub retries and then a
network error). Weight files (`*.safetensors`) are checked from their header alone (`safetensors_problem`):
a truncated file or a damaged header is named with its flag (the model's role) before any weights load,
instead of a SafetensorError traceback naming neither. The vocabulary is read from tokenizer.json alone, so the Snakefile can check a config
against the models on disk without loading transformers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from opd.infra.io import InputError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json",)


class ModelDirError(InputError):
    """A model or tokenizer directory that is missing or incomplete, or a K it cannot provide."""


def check_dir(path: Path | str, flag: str, need: tuple[str, ...] = MODEL_FILES) -> Path:
    """`path` as a local directory holding the files `need`, or a ModelDirError naming the flag and the path."""
    path = Path(path)
    if not path.is_dir():
        what = "exists but is not a directory" if path.exists() else "does not exist"
        raise ModelDirError(f"{flag} {path}: no model directory there ({what}; entry points read local "
                            f"directories only, the workflow downloads hub models first: config models.<name>.hub)")
    missing = [name for name in need if not (path / name).is_file()]
    if missing:
        raise ModelDirError(f"{flag} {path}: not a complete Hugging Face directory ({', '.join(missing)} missing)")
    problems = weight_problems(path)
    if problems:
        raise ModelDirError(f"{flag} {problems[0]}; {REMAKE}")
    return path


REMAKE = "delete the model directory and rerun the job that made it (or fetch it again)"


def weight_problems(directory: Path | str) -> list[str]:
    """`safetensors_problem` of each *.safetensors file of a model directory."""
    found = (safetensors_problem(p) for p in sorted(Path(directory).glob("*.safetensors")))
    return [p for p in found if p]


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot load, read from its header alone (no tensor is read); None if it can.

    The format: 8 bytes (little-endian header length n), n bytes of JSON naming each tensor's byte range,
    then the data; a file whose size is not 8 + n + the last range's end was cut short (or padded).
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else None
        if n is None or n > size - 8:
            return f"{path}: truncated or corrupt ({size} bytes, too short for its header)"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        return f"{path}: corrupt (its header is not a JSON object)"
    try:
        expected = 8 + n + max((int(v["data_offsets"][1]) for v in header.values()
                                if isinstance(v, dict) and "data_offsets" in v), default=0)
    except (TypeError, ValueError, IndexError):
        return f"{path}: corrupt (a tensor's data_offsets in its header are not two numbers)"
    if size != expected:
        return f"{path}: truncated or corrupt ({size} bytes, its header describes {expected})"
    return None


def check_flag_dirs(args, *dests: str) -> None:
    """`check_dir` on the model directory of each named flag (e.g. "student" = --student)."""
    for dest in dests:
        check_dir(getattr(args, dest), "--" + dest.replace("_", "-"))


def vocab_size(directory: Path | str) -> int | None:
    """Distinct token ids of directory/tokenizer.json (vocabulary and added tokens); None without the file."""
    tokenizer = _tokenizer_json(directory)
    return None if tokenizer is None else len(_token_ids(tokenizer))


def _tokenizer_json(directory: Path | str) -> dict | None:
    path = Path(directory) / "tokenizer.json"
    return _read_json(str(path), path.stat().st_mtime_ns) if path.is_file() else None


@functools.lru_cache(maxsize=16)
def _read_json(path: str, mtime_ns: int) -> dict:
    """A hub tokenizer.json is ~10 MB: read once per version of the file (a config check reads it per pair)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _token_ids(tokenizer: dict) -> dict:
    """token -> id over the model's vocabulary (a BPE/WordPiece dict or a Unigram list) and added tokens."""
    vocab = tokenizer.get("model", {}).get("vocab") or {}
    pairs = vocab.items() if isinstance(vocab, dict) else ((piece, i) for i, (piece, _) in enumerate(vocab))
    out = dict(pairs)
    out.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})
    return out


def regular_difference(a: Path | str, b: Path | str) -> tuple[int, str | None, str | None] | None:
    """(id, token in a, token in b) of the first id that two directories' tokenizer.json read differently among
    their regular (non-added) tokens; None if they agree or one is missing. Added tokens and chat templates
    may differ: a teacher then reads the student's ids through opd.engines.pairing."""
    ta, tb = _tokenizer_json(a), _tokenizer_json(b)
    if ta is None or tb is None:
        return None
    ra, rb = ({i: t for t, i in _token_ids(tok).items() if i not in {x["id"] for x in tok.get("added_tokens", [])}}
              for tok in (ta, tb))
    first = next((i for i in sorted(set(ra) | set(rb)) if ra.get(i) != rb.get(i)), None)
    return None if first is None else (first, ra.get(first), rb.get(first))


def check_top_k(k: int, n_vocab: int, flag: str, where: Path | str) -> None:
    """K (the stored top-K) must not exceed the vocabulary: topk(K) over fewer entries fails in every job."""
    if k > n_vocab:
        raise ModelDirError(f"{flag} {k}: larger than the vocabulary of {where} ({n_vocab} tokens)")
