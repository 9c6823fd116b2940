"""Training checkpoints: atomic writes, the newest complete one found again, RNG states that replay.

OUT/checkpoints/step_{t:06d}/ holds model.pt, trainer.pt (optimizer, scheduler, RNG states as tensors and
lists, so `torch.load(weights_only=True)` reads them) and state.json (step, MLflow run id, metrics, flags),
written last: only a directory with state.json counts as complete.

Loading (`load_latest_checkpoint`) survives a crash during a save: a newest checkpoint whose files do not load
(truncated model.pt/trainer.pt/state.json, as a machine that died before its page cache reached the disk
leaves them) or do not match the sizes its state.json records (`files`, see `file_sizes`) is set aside as
checkpoints/corrupt-step_*/ with a warning naming it, and the previous one is loaded; at most one
set-aside copy is kept. Two corrupt checkpoints in a row are no crash during a save: that is an error.
A disk too full for a checkpoint (checked before writing, from the states' size; or the write failing for
want of space) is one `opd.infra.io.Fault` naming the directory and the previous checkpoint, which is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from opd.infra.io import space_for, tensor_bytes

KEEP_CHECKPOINTS = 2
CHECKPOINT_RE = re.compile(r"step_\d{6}")
CORRUPT_PREFIX = "corrupt-"
# What a file cut short raises: torch's zip reader (RuntimeError), the unpickler, json, a vanished file.
LOAD_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, json.JSONDecodeError, OSError, KeyError)


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was set aside; the message names it and the one resumed from instead."""


class CheckpointError(RuntimeError):
    """No usable checkpoint where one should be; the message names the directories."""


# May change on resumption: they do not change what is computed (study only names the MLflow experiment).
RESUME_EXEMPT = ("threads", "out_dir", "checkpoint_every", "restart_if_flags_changed", "study", "vllm_python",
                 "vllm_memory_fraction", "save_dtype", "keep_checkpoints",
                 # where the engines run and how weights reach them: the same numbers either way
                 "vllm_weight_push", "vllm_sleep", "vllm_enforce_eager", "teacher_placement", "teacher_device",
                 "teacher_url", "teacher_timeout", "teacher_concurrency",
                 # memory bounds: the same loss and gradient (to float rounding; checkpointing bit for bit)
                 "max_tokens_per_microbatch", "logit_chunk", "gradient_checkpointing")


def _rng_states() -> dict:
    """torch, python and numpy RNG states as tensors/lists, so `torch.load(weights_only=True)` reads them."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(py_state), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def restore_rng_states(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    version, py_state, gauss = rng["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _discard(path: Path) -> None:
    """Rename, then delete: a half-deleted checkpoint never sits under a name that looks complete."""
    trash = path.with_name(f".trash_{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with their state.json (written last), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CHECKPOINT_RE.fullmatch(p.name) and (p / "state.json").is_file())


# The models a run starts from, by content: a student rebuilt at the same path (a new SFT, another download)
# makes the checkpoints another run's. Snakemake reruns the job then, but leaves checkpoints/ (not an output).
WEIGHT_KEYS = {"student": "student_weights", "teacher": "teacher_weights"}
DIGEST_SAMPLES, DIGEST_BYTES = 16, 1 << 16


def weights_digest(model_dir: Path) -> str:
    """sha256 of a model directory's *.safetensors: each file's name and size, its first 64 KiB (the header and
    the first weights) and 16 evenly spaced 64 KiB samples. A retrained or rebuilt model differs everywhere,
    so the samples see it, and reading ~1 MiB per file costs milliseconds even for a 16 GB model; an edit of a
    few bytes between two samples is not seen."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for offset in sorted({0, *(i * size // DIGEST_SAMPLES for i in range(1, DIGEST_SAMPLES))}):
                fh.seek(offset)
                digest.update(fh.read(DIGEST_BYTES))
    return digest.hexdigest()


def _resume_flags(args: argparse.Namespace) -> dict:
    flags = {k: str(v) for k, v in vars(args).items() if k not in RESUME_EXEMPT}
    return flags | {key: weights_digest(getattr(args, flag)) for flag, key in WEIGHT_KEYS.items()
                    if getattr(args, flag, None) is not None}


def save_checkpoint(out_dir: Path, step: int, args: argparse.Namespace, model_state: dict, optimizer_state: dict,
                    scheduler_state: dict, run_id: str, metrics: dict, keep: int = KEEP_CHECKPOINTS,
                    extra=None) -> Path:
    """OUT/checkpoints/step_{step:06d}, written atomically; only the newest `keep` are kept.

    The states are CPU copies (a checkpoint loads on a machine without a GPU); `args` are the run's
    flags, stored so that a resume with other flags is refused (`changed_flags`). `extra(tmp)`, if given,
    adds files to the temporary directory (the pending rollouts of `opd.engines.async_rollouts`).
    """
    root = out_dir / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    done = complete_checkpoints(root)
    kept = (f"the previous checkpoint {done[-1]} is kept: free some space and rerun to resume from it" if done
            else "no checkpoint of this run is complete yet")
    try:  # too little space: refused before writing (the states' size is known), or the failed write translated
        with space_for(final, tensor_bytes((model_state, optimizer_state)), kept):
            tmp.mkdir(parents=True)
            torch.save(model_state, tmp / "model.pt")
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": _rng_states()},
                       tmp / "trainer.pt")
            if extra is not None:
                extra(tmp)
            state = {"step": step, "run_id": run_id, "metrics": metrics, "flags": _resume_flags(args),
                     "files": file_sizes(tmp)}  # checked at load: a truncated file is found before torch.load
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never half a checkpoint on a full disk
        raise
    if final.exists():  # an incomplete leftover (no state.json) or an older copy of this very step
        _discard(final)
    tmp.rename(final)
    for old in complete_checkpoints(root)[:-keep]:
        _discard(old)
    return final


def prune_finished(out_dir: Path) -> None:
    """A finished run keeps only its last checkpoint: what a resume (e.g. with more --steps) needs."""
    for old in complete_checkpoints(out_dir / "checkpoints")[:-1]:
        _discard(old)


def file_sizes(directory: Path) -> dict[str, int]:
    """Size in bytes of each file of a checkpoint directory (state.json's `files`, checked at load)."""
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != "state.json"}


def _load(path: Path) -> dict:
    """One checkpoint: its state.json plus `model` and `trainer`; LOAD_ERRORS or a ValueError if it is damaged."""
    state = json.loads((path / "state.json").read_text())
    for name, size in state.get("files", {}).items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise ValueError(f"{path / name} has {actual} bytes, its state.json records {size}")
    return {**state, "path": path, "model": torch.load(path / "model.pt", weights_only=True, map_location="cpu"),
            "trainer": torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")}


def _set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to corrupt-<name>, the one set-aside copy (older ones are deleted)."""
    target = path.with_name(CORRUPT_PREFIX + path.name)
    for old in path.parent.glob(CORRUPT_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    try:
        path.rename(target)
    except FileNotFoundError:  # another rank of the same run set it aside first
        pass
    return target


def load_latest_checkpoint(out_dir: Path) -> dict | None:
    """The newest complete checkpoint that loads: its state.json plus `model` and `trainer` state dicts.

    None if there is none. A corrupt newest one is set aside (a CheckpointWarning names it) and the previous
    one is loaded; if that one is corrupt too, CheckpointError.
    """
    done = complete_checkpoints(out_dir / "checkpoints")
    for path in reversed(done[-2:]):
        try:
            return _load(path)
        except (*LOAD_ERRORS, ValueError) as err:
            if path != done[-1]:
                raise CheckpointError(f"{path} cannot be loaded either ({err}) after the newer "
                                      f"{done[-1].name} was corrupt: more than a crash during a save; "
                                      f"check the disk, or start afresh with another --out-dir") from None
            aside = _set_aside(path)
            previous = f"resuming from {done[-2]}" if len(done) > 1 else "no earlier checkpoint: starting afresh"
            warnings.warn(f"checkpoint {path} is corrupt ({type(err).__name__}: {err}); set aside as "
                          f"{aside}, {previous}", CheckpointWarning, stacklevel=2)
    return None


def set_aside_replaced(out_dir: Path) -> Path:
    """OUT/checkpoints renamed to OUT/checkpoints.replaced-<time> (a restart with other flags); older
    set-aside copies are deleted, so one is kept and disk use stays bounded."""
    for old in out_dir.glob("checkpoints.replaced-*"):
        shutil.rmtree(old)
    target = out_dir / f"checkpoints.replaced-{time.time():.0f}"
    (out_dir / "checkpoints").rename(target)
    return target


# Flags added after checkpoints were first written -> their default: an older checkpoint was written with it.
ADDED_FLAG_DEFAULTS = {"async_rollouts": "0", "clip_eps_high": "None", "optimizer": "adamw", "weight_decay": "0.01",
                       "betas": "[0.9, 0.999]", "adam_eps": "1e-08", "lr_schedule": "warmup"}


def changed_flags(args: argparse.Namespace, ckpt: dict) -> list[str]:
    """The flags (and `WEIGHT_KEYS`: the models' contents) that differ from the checkpoint's; a checkpoint from
    before the weights were recorded is compared on its flags alone."""
    written = {**ADDED_FLAG_DEFAULTS, **ckpt["flags"]}
    return sorted(k for k, v in _resume_flags(args).items()
                  if written.get(k) != v and (k in written or k not in WEIGHT_KEYS.values()))
