"""Small I/O helpers that fail with an error naming the file."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator


class InputError(ValueError):
    """Bad input from the user (a flag, a config key, a data or model file): `opd.infra.cli.run` prints it in
    one line. Each message names the flag, key or file (and line) and the value."""


class DataFileError(InputError):
    """A data file that is missing or malformed; the message names the file and the line."""


def read_jsonl(path: Path | str, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file; each must be a JSON object holding the `required` keys."""
    return [rec for _, rec in numbered_jsonl(path, required)]


def numbered_jsonl(path: Path | str, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSONL file, checked as `read_jsonl` checks them."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path}")
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataFileError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            records.append((lineno, rec))
    if not records:
        raise DataFileError(f"data file is empty: {path}")
    return records


PROMPT_KEYS = ("id", "question", "answer")


def read_prompts(path: Path | str) -> list[dict]:
    """A prompts file (JSONL of {id, question, answer}): every id once, no empty question or answer.

    Refused, not repaired: a repeated id would put one id twice into a rollouts file, and which of the two
    records was meant is the user's call; the message names both lines.
    """
    seen: dict[str, int] = {}
    out = []
    for lineno, rec in numbered_jsonl(path, PROMPT_KEYS):
        for key in ("question", "answer"):
            if rec[key] is None or not str(rec[key]).strip():
                raise DataFileError(f"{path}:{lineno}: empty {key} (id {rec['id']!r})")
        key = str(rec["id"])
        if key in seen:
            raise DataFileError(f"{path}:{lineno}: duplicate id {rec['id']!r} (first at line {seen[key]}); "
                                f"each prompt needs its own id")
        seen[key] = lineno
        out.append(rec)
    return out


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; moved onto `path` only if the block succeeds.

    The one atomic writer of the package: a killed job leaves either the old file or the new one,
    never half a file (os.replace is atomic on one filesystem, hence the sibling).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: Path | str, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def write_rows_csv(path: Path | str, rows: list[dict]) -> None:
    """A CSV with one row per dict, columns in the first dict's key order."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_model_dir(model, tokenizer, out_dir: Path, dtype=None) -> None:
    """A Hugging Face model directory, written to a sibling and swapped in, so a killed job leaves no
    half-written model: the old directory is renamed aside before the new one moves in, so at every
    instant either the old or the new model is complete on disk.

    `dtype` (a torch dtype, e.g. bfloat16: half the disk of fp32 master weights) casts the saved weights
    and the config's dtype; the model itself is left as it is.
    """
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype is None or dtype == model.dtype:
        model.save_pretrained(str(tmp))
    else:
        cast: dict = {}  # one cast per storage: tied weights (embeddings = LM head) stay one tensor
        state = {k: cast.setdefault(v.data_ptr(), v.detach().to(dtype)) for k, v in model.state_dict().items()}
        model.save_pretrained(str(tmp), state_dict=state)
        config = json.loads((tmp / "config.json").read_text())  # transformers writes the model's own dtype
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
