"""Compact per-token storage of rollouts and teacher scores (safetensors + a versioned header).

Sequences are ragged, so every per-token tensor is stored FLAT over the N response tokens of the
batch, with `offsets_B1` (B + 1 entries) marking where each sequence starts; top-K data is [N, K].
Nothing is ever stored per vocabulary entry. The safetensors header carries the format name, its
version, the rollout ids and a JSON `meta` block, so a file from another format version, a truncated
file, or a scores file that belongs to other rollouts is refused with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opd.infra.io import InputError, atomic_path


class StoreError(InputError):
    """A rollout/score file that is missing, truncated, of another format or version, or inconsistent."""


def save(path: Path | str, kind: str, version: int, tensors: dict[str, Tensor], ids: list[str],
         meta: dict[str, Any]) -> None:
    """Write atomically: a killed job leaves the old file or none, never half of one."""
    from safetensors.torch import save_file

    header = {"format": kind, "version": str(version), "ids": json.dumps(ids), "meta": json.dumps(meta)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)


def load(path: Path | str, kind: str, version: int, required: tuple[str, ...]) -> tuple[dict, list[str], dict]:
    """(tensors, ids, meta) of a file written by `save`, after checking its kind, version and shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error type for truncated/corrupt files
        raise StoreError(f"{path}: unreadable or truncated safetensors file ({err})") from None
    if header.get("format") != kind:
        raise StoreError(f"{path}: expected a {kind!r} file, found format {header.get('format')!r}")
    if header.get("version") != str(version):
        raise StoreError(f"{path}: {kind} format version {header.get('version')!r}; this code reads "
                         f"version {version} (regenerate the file)")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise StoreError(f"{path}: missing tensor(s) {', '.join(missing)}")
    ids, meta = json.loads(header["ids"]), json.loads(header["meta"])
    _check_shapes(path, tensors, ids)
    return tensors, ids, meta


def _check_shapes(path: Path, tensors: dict[str, Tensor], ids: list[str]) -> None:
    offsets = tensors["offsets_B1"]
    if offsets.numel() != len(ids) + 1:
        raise StoreError(f"{path}: {len(ids)} ids but {offsets.numel()} offsets (expected ids + 1)")
    if offsets[0] != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise StoreError(f"{path}: offsets_B1 must start at 0 and never decrease")
    n = int(offsets[-1])
    for name, t in tensors.items():
        if name.endswith(("_N", "_NK")) and t.shape[0] != n:
            raise StoreError(f"{path}: {name} has {t.shape[0]} rows, offsets say {n} tokens")


def check_finite(path: Path | str, tensors: dict[str, Tensor], ids: list[str], names: tuple[str, ...]) -> None:
    """Raise naming the rollout id (and position) of the first NaN/Inf in any `names` tensor."""
    offsets = tensors["offsets_B1"]
    for name in names:
        t = tensors[name].float()
        bad = ~torch.isfinite(t)
        if t.dim() > 1:
            bad = bad.any(dim=-1)
        if bool(bad.any()):
            flat = int(bad.nonzero()[0, 0])
            seq = int(torch.searchsorted(offsets, torch.tensor(flat), right=True)) - 1
            raise StoreError(f"{path}: non-finite {name} in rollout {ids[seq]!r} at response position "
                             f"{flat - int(offsets[seq])}")


def fingerprint(ids: list[str], *tensors: Tensor) -> str:
    """A hash of what identifies a rollout batch (ids, prompts, responses); scores record it to prove
    which rollouts they score."""
    h = hashlib.sha256(json.dumps(ids).encode())
    for t in tensors:
        h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def to_padded(flat_N: Tensor, offsets_B1: Tensor, pad: float | int = 0) -> tuple[Tensor, Tensor]:
    """(padded_BT..., valid_BT): right-padded per-sequence view of a flat per-token tensor."""
    lengths_B = offsets_B1[1:] - offsets_B1[:-1]
    B, T = lengths_B.numel(), int(lengths_B.max()) if lengths_B.numel() else 0
    valid_BT = torch.arange(T)[None, :] < lengths_B[:, None]
    out = torch.full((B, T, *flat_N.shape[1:]), pad, dtype=flat_N.dtype)
    out[valid_BT] = flat_N
    return out, valid_BT
