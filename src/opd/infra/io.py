"""Small I/O helpers that fail with an error naming the file."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator


class InputError(ValueError):
    """Bad input from the user (a flag, a config key, a data or model file): `opd.infra.cli.run` prints it in
    one line. Each message names the flag, key or file (and line) and the value."""


class Fault(RuntimeError):
    """The machine failed a job (a full disk, a worker that died), not the input: `opd.infra.cli.run` prints
    it in one line too (OPD_TRACEBACK=1 for the traceback); each message names the path and what was kept."""


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


def tensor_bytes(tensors, itemsize: int | None = None) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples (each storage once): what a save writes.

    `itemsize` (bytes per element) replaces each tensor's own, for a save that casts (save_dtype)."""
    seen, total, stack = set(), 0, [tensors]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "element_size") and hasattr(obj, "numel") and obj.data_ptr() not in seen:
            seen.add(obj.data_ptr())
            total += obj.numel() * (itemsize or obj.element_size())
    return total


def _free_bytes(path: Path) -> int:
    while not path.exists():  # the directory may not exist yet: its nearest existing parent's disk
        path = path.parent
    return shutil.disk_usage(path).free


def _no_space(target: Path, need: int, free: int, kept: str) -> Fault:
    return Fault(f"{target}: no space left on the device ({free / 2**20:.0f} MiB free, the write needs about "
                 f"{need / 2**20:.0f} MiB); {kept}")


@contextlib.contextmanager
def space_for(target: Path, need: int, kept: str) -> Iterator[None]:
    """Refuse to start a write of about `need` bytes under `target` if the disk has less free, and turn a
    write that fails for want of space anyway (ENOSPC, or torch's `basic_ios::clear: iostream error` with the
    disk full) into a Fault naming the path, its sizes and `kept` (what is still complete on disk)."""
    free = _free_bytes(target)
    if free < need:
        raise _no_space(target, need, free, kept)
    try:
        yield
    except (OSError, RuntimeError) as err:
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        free = _free_bytes(target)
        if full or free < need:  # measured before the half-written file is removed
            raise _no_space(target, need, free, kept) from err
        raise


def save_model_dir(model, tokenizer, out_dir: Path, dtype=None) -> None:
    """A Hugging Face model directory, written to a sibling and swapped in, so a killed job leaves no
    half-written model: the old directory is renamed aside before the new one moves in, so at every
    instant either the old or the new model is complete on disk. Too little disk space (checked before,
    and a failed write after) is a Fault naming the directory; the old one stays.

    `dtype` (a torch dtype, e.g. bfloat16: half the disk of fp32 master weights) casts the saved weights
    and the config's dtype; the model itself is left as it is.
    """
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    kept = f"the model already in {out_dir} is kept" if out_dir.exists() else "nothing was written"
    need = tensor_bytes(model.state_dict(), getattr(dtype, "itemsize", None))
    try:
        with space_for(out_dir, need, kept):
            _save_pretrained(model, tokenizer, tmp, dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _save_pretrained(model, tokenizer, tmp: Path, dtype) -> None:
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
