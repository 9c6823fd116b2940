"""Throughput and MFU of the OPD update (`opd.engines.update.update_step`) on a Qwen3-0.6B-shaped model.

The step is the trainer's own: the student's logits at the supervised positions only
(`opd.engines.forward.supervised_map` with keep_N, chunked), the PPO-clip OPD loss of `opd.math.loss` (`--loss`), gradient
clipping, AdamW and the scheduler, under the trainer's precision policy (`--dtype bfloat16`: fp32
master weights + bf16 autocast, see `opd.engines.accel`). Weights and rollouts are random: throughput does not
depend on their values. Sequences are `--seq` tokens long, `--prompt-len` of them prompt; `--keep` is
the supervised fraction of the response positions (1.0 = the `full` method).

FLOPs per step (forward + backward = 3 × the forward's 2 FLOPs per multiply-add):

    6 · N · B·S                  trunk matmuls, N = non-embedding parameters, every token of every sequence
  + 6 · V · H · M                LM head, only at the M supervised positions (V vocab, H hidden)
  + 12 · L · h · d · S · B·S     attention scores and values (L layers, h heads, head dim d), counted for the
                                 full S×S square as in the PaLM/Megatron convention (causal kernels skip
                                 about half, so this slightly flatters MFU at long S)

With every response position supervised (M ≈ B·S) this is the usual per-token 6·(N + V·H) + 12·L·h·d·S.
MFU = achieved FLOP/s / `--peak-flops` (default 989e12: H100 SXM dense bf16; H200 has the same).

    python benchmarks/train_mfu.py --device cuda --dtype bfloat16 --batch 4 --seq 2048
    .venv/bin/python benchmarks/train_mfu.py --preset tiny --device cpu          # seconds, as in the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PRESETS = {  # Qwen3-0.6B's shape (tied embeddings), and a tiny one for CPU tests
    "qwen3-0.6b": dict(vocab=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072),
    "tiny": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=192),
}


def build_model(shape: dict, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      head_dim=shape["head_dim"], intermediate_size=shape["intermediate"], tie_word_embeddings=True,
                      max_position_embeddings=40960, pad_token_id=0)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to(device)  # fp32 master weights, as opd.engines.train keeps them


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def step_flops(n_params: int, shape: dict, batch: int, seq: int, supervised: int) -> float:
    """FLOPs of one forward + backward (the module docstring's formula)."""
    trunk = 6 * n_params * batch * seq
    head = 6 * shape["vocab"] * shape["hidden"] * supervised
    attention = 12 * shape["layers"] * shape["heads"] * shape["head_dim"] * seq * batch * seq
    return float(trunk + head + attention)


def build_trainer(args, shape: dict, device: torch.device):
    """A `opd.train.Trainer` around the random model, and a random rollout batch with its mask."""
    from opd import worlds
    from opd.engines import train
    from opd.engines.signals import resolve_signal_args
    from opd.engines.rollout import Rollouts

    targs = train.parse_args(["--student", "-", "--teacher", "-", "--world", "miniature", "--prompts", "-", "--out-dir", "-",
                              "--method", "full", "--dtype", args.dtype, "--loss", args.loss,
                              "--device", device.type])
    resolve_signal_args(targs)  # the paper variant's aggregation etc., as train.check_args fills them
    model = build_model(shape, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr = train.Trainer(targs, worlds.get("miniature"), model, None, None, [], [], opt, sched, device=device)
    B, P, T = args.batch, args.prompt_len, args.seq - args.prompt_len
    N, K, V = B * T, targs.top_k, shape["vocab"]
    g = torch.Generator().manual_seed(0)
    rollouts = Rollouts([f"r{i}" for i in range(B)], {
        "offsets_B1": torch.arange(B + 1) * T, "tokens_N": torch.randint(V, (N,), generator=g, dtype=torch.int32),
        "s_logprob_N": -torch.rand(N, generator=g) * 5, "prompt_offsets_B1": torch.arange(B + 1) * P,
        "prompt_tokens_P": torch.randint(V, (B * P,), generator=g, dtype=torch.int32),
        "s_topk_ids_NK": torch.randint(V, (N, K), generator=g, dtype=torch.int32),
        "s_topk_logprobs_NK": -torch.rand(N, K, generator=g) * 5})
    scores = {"t_logprob_N": -torch.rand(N, generator=g) * 5, "t_on_s_logprobs_NK": -torch.rand(N, K, generator=g),
              "t_topk_ids_NK": torch.randint(V, (N, K), generator=g, dtype=torch.int32),
              "t_topk_logprobs_NK": -torch.rand(N, K, generator=g) * 5}
    mask_BT = torch.rand(B, T, generator=g) < args.keep
    mask_BT[:, -1] = True  # the last position kept: every sequence runs its full length, as the formula assumes
    return tr, rollouts, scores, mask_BT


def measure(args) -> dict:
    from opd.engines import accel
    from opd.engines.train import update_step

    device = accel.resolve_device(args.device)
    torch.set_num_threads(args.threads)
    shape = PRESETS[args.preset]
    tr, rollouts, scores, mask_BT = build_trainer(args, shape, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):  # allocator, kernels, AdamW state
        update_step(tr, rollouts, scores, mask_BT, i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        update_step(tr, rollouts, scores, mask_BT, args.warmup + i)
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    n_params = non_embedding_params(tr.student)
    flops = step_flops(n_params, shape, args.batch, args.seq, int(mask_BT.sum()))
    return {"preset": args.preset, "device": str(device), "gpu": torch.cuda.get_device_name(device)
            if device.type == "cuda" else None, "dtype": args.dtype, "loss": args.loss, "batch": args.batch,
            "seq": args.seq, "supervised_positions": int(mask_BT.sum()), "non_embedding_params": n_params,
            "flops_per_step": flops, "step_seconds_median": seconds, "step_seconds": times,
            "tokens_per_second": args.batch * args.seq / seconds, "achieved_tflops": flops / seconds / 1e12,
            "peak_tflops": args.peak_flops / 1e12, "mfu": flops / seconds / args.peak_flops,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Throughput and MFU of the OPD training update.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b", help="model shape (random weights)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the step runs")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="the trainer's --dtype (bfloat16: fp32 master weights + bf16 autocast)")
    p.add_argument("--loss", default="pg", help="the trainer's --loss (pg or a top-K distribution loss)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (prompt + response)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (no loss there)")
    p.add_argument("--keep", type=float, default=1.0, help="supervised fraction of the response positions")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="the device's peak FLOP/s for MFU (default: H100 SXM dense bf16, 989e12)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    if not 0 < args.prompt_len < args.seq:
        p.error("--prompt-len must be in (0, --seq)")
    return args


def main(argv: list[str] | None = None) -> dict:
    result = measure(parse_args(argv))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
