"""Teacher-scoring throughput and storage per token, measured in one run (not a timed test).

Scores synthetic rollouts (random response tokens and student top-K ids) with the miniature teacher
and prints tokens/s and the bytes stored per token against the bound 16·(2K + 4).

    .venv/bin/python benchmarks/score_throughput.py --teacher results/models/teacher --top-k 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def synthetic_rollouts(vocab: int, n_seq: int, prompt_len: int, resp_len: int, K: int, seed: int):
    from opd.engines.rollout import Rollouts

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(resp_len // 2, resp_len + 1, (n_seq,), generator=g)
    N = int(lengths.sum())
    tensors = {
        "offsets_B1": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "tokens_N": torch.randint(vocab, (N,), generator=g, dtype=torch.int32),
        "s_logprob_N": torch.zeros(N),
        "s_topk_ids_NK": torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(N)]).to(torch.int32),
        "s_topk_logprobs_NK": torch.zeros(N, K),
        "prompt_offsets_B1": torch.arange(n_seq + 1) * prompt_len,
        "prompt_tokens_P": torch.randint(vocab, (n_seq * prompt_len,), generator=g, dtype=torch.int32),
    }
    return Rollouts([f"r{i}" for i in range(n_seq)], tensors, {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=Path("results/models/teacher"), help="teacher model dir")
    p.add_argument("--top-k", type=int, default=16, help="K")
    p.add_argument("--sequences", type=int, default=256, help="rollouts to score")
    p.add_argument("--prompt-len", type=int, default=40, help="prompt tokens per rollout")
    p.add_argument("--response-len", type=int, default=96, help="longest response (lengths are drawn in [len/2, len])")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from opd.engines.score import save_scores, score_rollouts

    torch.set_num_threads(args.threads)
    teacher = AutoModelForCausalLM.from_pretrained(str(args.teacher)).eval()
    K = args.top_k
    rollouts = synthetic_rollouts(teacher.config.vocab_size, args.sequences, args.prompt_len,
                                  args.response_len, K, seed=0)
    N = int(rollouts.tensors["offsets_B1"][-1])
    score_rollouts(teacher, synthetic_rollouts(teacher.config.vocab_size, 8, 8, 8, K, 1), K, 8)  # warm-up
    start = time.perf_counter()
    scores = score_rollouts(teacher, rollouts, K, args.batch_size)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "scores.safetensors"
        save_scores(path, rollouts, scores, {"K": K})
        size = path.stat().st_size
    bound = 16 * (2 * K + 4)
    print(f"teacher: {args.teacher} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params, "
          f"vocab {teacher.config.vocab_size}), K = {K}, {args.threads} threads")
    print(f"scored {N} response tokens of {args.sequences} rollouts in {seconds:.2f} s: {N / seconds:,.0f} tokens/s")
    print(f"stored {size / N:.1f} bytes/token (file {size:,} B incl. header); bound 16*(2K+4) = {bound} B/token; "
          f"ratio {size / N / bound:.2f}")


if __name__ == "__main__":
    main()
