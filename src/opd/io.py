"""Small I/O helpers that fail with an error naming the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class DataFileError(ValueError):
    """A data file that is missing or malformed; the message names the file and the line."""


def read_jsonl(path: Path | str, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file; each must be a JSON object holding the `required` keys."""
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
            records.append(rec)
    if not records:
        raise DataFileError(f"data file is empty: {path}")
    return records


def write_rows_csv(path: Path | str, rows: list[dict]) -> None:
    """A CSV with one row per dict, columns in the first dict's key order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
