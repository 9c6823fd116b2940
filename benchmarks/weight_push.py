"""Cost of pushing the student's weights to the rollout engines, before/after, measured in one run (CPU).

Before (`--vllm-weight-push per_rank`): every rank writes its own safetensors copy under the run directory
and its engine reads it back. After (`shm`, the default): local rank 0 writes ONE copy per node to
/dev/shm and every local engine reads that one. Both use the trainer's own writer
(`opd.engines.vllm_engine.write_weights`) on a random bf16 state dict shaped like Qwen3-1.7B (28 layers,
hidden 2048, MLP 6144, 16/8 heads of 128, vocabulary 151,936, tied embedding: 1.72B parameters, 3.44 GB).

`--fraction f` builds f of it (f of the layers and of the embedding rows) to stay light on a shared
machine; the full-size figures are extrapolated linearly (bytes exactly, times as measured × 1/f) and
printed as such. The reads stand for the engines' (vLLM reads the same file with safetensors).
Disk writes are not fsynced (neither are the trainer's): they land in the page cache, so the "before"
times are a lower bound of what a shared cluster filesystem costs; the byte ratio is exact. Ranks are
simulated one after another in this process (on one node they share the disk's bandwidth anyway).

    PYTHONPATH=src .venv/bin/python benchmarks/weight_push.py --fraction 0.25 --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

LAYERS, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 28, 2048, 6144, 16, 8, 128, 151_936


class StateDict:
    """Just what `write_weights` asks of a model: `state_dict()`."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def qwen3_1p7b_state(fraction: float) -> dict[str, torch.Tensor]:
    """Random bf16 tensors with Qwen3-1.7B's names and shapes, `fraction` of its layers and vocabulary."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)  # noqa: E731
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    state = {"model.embed_tokens.weight": rand(round(VOCAB * fraction), HIDDEN), "model.norm.weight": rand(HIDDEN)}
    for i in range(max(1, round(LAYERS * fraction))):
        pre = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (q, HIDDEN)), ("self_attn.k_proj", (kv, HIDDEN)),
                            ("self_attn.v_proj", (kv, HIDDEN)), ("self_attn.o_proj", (HIDDEN, q)),
                            ("mlp.gate_proj", (MLP, HIDDEN)), ("mlp.up_proj", (MLP, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, MLP))):
            state[pre + name + ".weight"] = rand(*shape)
        for name, n in (("input_layernorm", HIDDEN), ("post_attention_layernorm", HIDDEN),
                        ("self_attn.q_norm", HEAD_DIM), ("self_attn.k_norm", HEAD_DIM)):
            state[pre + name + ".weight"] = rand(n)
    return state


def full_params() -> int:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    layer = HIDDEN * (2 * q + 2 * kv) + 3 * HIDDEN * MLP + 2 * HIDDEN + 2 * HEAD_DIM
    return LAYERS * layer + VOCAB * HIDDEN + HIDDEN


def read(path: Path) -> float:
    """Seconds to read every tensor of the file into fresh memory (as an engine copies it into its weights)."""
    from safetensors import safe_open

    start = time.perf_counter()
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():
            src = fh.get_tensor(name)
            torch.empty_like(src).copy_(src)  # touch every byte: the file is mapped lazily
    return time.perf_counter() - start


def push(model, ranks: int, mode: str, run_dir: Path, shm_dir: Path) -> dict:
    """One step's push on one node of `ranks` ranks: bytes written, write and read seconds."""
    from opd.engines.vllm_engine import write_weights

    files, start = [], time.perf_counter()
    if mode == "per_rank":
        files = [write_weights(model, run_dir / f"rank{r}", torch.bfloat16, version=1) for r in range(ranks)]
    else:
        files = [write_weights(model, shm_dir, torch.bfloat16, version=1)]
    write_s = time.perf_counter() - start
    read_s = sum(read(files[r if mode == "per_rank" else 0]) for r in range(ranks))
    nbytes = sum(f.stat().st_size for f in files)
    for f in files:
        shutil.rmtree(f.parent, ignore_errors=True)
    return {"mode": mode, "ranks": ranks, "bytes_written_per_node": nbytes, "write_s": write_s, "read_s": read_s,
            "push_s": write_s + read_s}


def measure(fraction: float, ranks: list[int], run_dir: Path | None = None) -> tuple[list[dict], float]:
    """(one `push` row per ranks × mode, the factor to full Qwen3-1.7B size), printing the build's sizes."""
    state = qwen3_1p7b_state(fraction)
    model, n = StateDict(state), sum(t.numel() for t in state.values())
    scale = full_params() / n
    print(json.dumps({"params_built": n, "params_full": full_params(), "extrapolation_factor": round(scale, 3)}))
    work = run_dir or Path(tempfile.mkdtemp(prefix="opd-weight-push-", dir="."))
    shm_dir = Path(tempfile.mkdtemp(prefix="opd-weight-push-", dir="/dev/shm"))
    try:
        return [push(model, r, mode, work, shm_dir) for r in ranks for mode in ("per_rank", "shm")], scale
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
        if run_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.25, help="share of Qwen3-1.7B built (memory); 1 = full")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="ranks per node to simulate")
    p.add_argument("--run-dir", type=Path, default=None, help="where per-rank files go (default: a temp dir)")
    args = p.parse_args(argv)
    rows, scale = measure(args.fraction, args.ranks, args.run_dir)
    print(f"{'ranks':>5} {'mode':>8} {'GB/node (1.7B)':>15} {'write s':>8} {'read s':>7} {'push s (1.7B)':>14}")
    for row in rows:
        print(f"{row['ranks']:>5} {row['mode']:>8} {row['bytes_written_per_node'] * scale / 1e9:>15.2f} "
              f"{row['write_s']:>8.2f} {row['read_s']:>7.2f} {row['push_s'] * scale:>14.2f}")
        print(json.dumps({**row, "bytes_written_per_node_full": round(row["bytes_written_per_node"] * scale),
                          "push_s_full": row["push_s"] * scale}))
    for r in args.ranks:
        before, after = (next(x for x in rows if x["ranks"] == r and x["mode"] == m) for m in ("per_rank", "shm"))
        print(f"ranks={r}: shm/per_rank bytes written per node = "
              f"{after['bytes_written_per_node'] / before['bytes_written_per_node']:.3f}, "
              f"push time = {after['push_s'] / before['push_s']:.3f}")


if __name__ == "__main__":
    main()
