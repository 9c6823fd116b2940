"""Cost of one OPD update when 10% of positions are supervised vs all, measured in one run.

Runs `opd.engines.update.update_step` (the trainer's own code path: logits only at supervised positions, each
sequence cut after its last supervised token) on a random-weight Qwen3 model with a 32k vocabulary. Each
variant runs in a fresh subprocess so that its peak memory is its own: peak RSS growth over the step on CPU,
`torch.cuda.max_memory_allocated` on GPU. Prints step time and peak memory per variant and the ratios
(targets: time ≤ 0.5×, peak memory ≤ 0.3×).

    .venv/bin/python benchmarks/train_step_cost.py            # CPU, 2 threads
    python benchmarks/train_step_cost.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def build(args):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd.engines.rollout import Rollouts
    from opd.engines.train import Trainer, parse_args

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=args.hidden // 4, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype))
    B, P, T, N = args.sequences, args.prompt_len, args.response_len, args.sequences * args.response_len
    g = torch.Generator().manual_seed(0)
    rollouts = Rollouts([f"r{i}" for i in range(B)], {
        "offsets_B1": torch.arange(B + 1) * T, "tokens_N": torch.randint(args.vocab, (N,), generator=g),
        "s_logprob_N": -torch.rand(N, generator=g) * 5, "prompt_offsets_B1": torch.arange(B + 1) * P,
        "prompt_tokens_P": torch.randint(args.vocab, (B * P,), generator=g)})
    scores = {"t_logprob_N": -torch.rand(N, generator=g) * 5}
    keep = args.keep
    mask_BT = torch.rand(B, T, generator=g) < keep if keep < 1 else torch.ones(B, T, dtype=torch.bool)
    mask_BT[:, 0] = True  # at least one position per sequence, as the selectors guarantee
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # The trainer's own flag defaults (loss, dtype, clip range...), so this cannot drift from opd.train.
    targs = parse_args(["--student", "-", "--teacher", "-", "--world", "miniature", "--prompts", "-", "--out-dir", "-", "--method", "full",
                        "--dtype", args.dtype, "--device", "cuda" if args.device.startswith("cuda") else "cpu"])
    tr = Trainer(targs, model, None, None, [], [], opt, sched, device=torch.device(args.device))
    return tr, rollouts, scores, mask_BT


def run_variant(args) -> dict:
    import torch

    from opd.engines.train import update_step

    torch.set_num_threads(args.threads)
    tr, rollouts, scores, mask_BT = build(args)
    update_step(tr, rollouts, scores, mask_BT, 0)  # warm-up: allocator, optimizer state
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import resource

        base = rss_mb()
    start = time.perf_counter()
    for step in range(args.steps):
        update_step(tr, rollouts, scores, mask_BT, step + 1)
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"seconds_per_step": (time.perf_counter() - start) / args.steps, "peak_mb": peak,
            "supervised": int(mask_BT.sum()), "positions": mask_BT.numel()}


def main() -> None:
    p = argparse.ArgumentParser(description="OPD update cost: 10% of positions supervised vs all.")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--sequences", type=int, default=8, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--response-len", type=int, default=384, help="response tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="model dtype (bfloat16 on GPU)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--keep", type=float, default=None, help="(internal) run one variant with this share kept")
    args = p.parse_args()
    if args.keep is not None:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for keep in (1.0, 0.1):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--keep", str(keep)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[keep] = json.loads(out)
        r = results[keep]
        print(f"kept {keep:>4.0%} ({r['supervised']}/{r['positions']} positions): "
              f"{r['seconds_per_step']:.3f} s/step, peak +{r['peak_mb']:.0f} MiB")
    full, sparse = results[1.0], results[0.1]
    print(f"ratio 10%/all: time {sparse['seconds_per_step'] / full['seconds_per_step']:.2f}x (target <= 0.5), "
          f"peak memory {sparse['peak_mb'] / full['peak_mb']:.2f}x (target <= 0.3)")


if __name__ == "__main__":
    main()
