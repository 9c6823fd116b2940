"""Peak host memory of one update, one scoring pass (exact mode) and one generate_hf call vs response length.

A random Qwen3-shaped model with the paper's vocabulary (151,936) and a small trunk, on the CPU: the
LM head and everything of size [positions, V] dominate, which is what the chunked head, the token
budget and the logits recorder of generate_hf bound (docs/training.md, "Memory"). Each measurement runs
in a fresh subprocess and reports its peak resident set size (getrusage ru_maxrss) minus the resident
size just before the measured call, so no measurement inherits another's allocations.

- update: `opd.engines.update.update_step` on one fully supervised sequence of a 64-token prompt + L
  response tokens, budget 16,640 tokens per micro-batch (one 16k sequence + prompt); one sequence so
  that the old code's [L, V] blocks fit a small machine at 4k (about 7 GB);
- score: `opd.engines.score.score_rollouts` with teacher and student (exact mode) on the same sequence;
- rollout: `generate_hf` of one greedy response of L tokens (up to 4k; the KV cache is under 10 MB here).
`new` = the defaults (logit_chunk 441 positions at this vocabulary); `old` = what the code did before
this change: for update/score the same code with one chunk and one micro-batch for the whole batch
(`--logit-chunk`/budget = 10^9, i.e. [N, V] logits; the previous scoring also kept the teacher's [N, V]
during the student's pass, so its real peak was higher still), for rollouts transformers'
`output_logits` and a [B, T, V] stack (the previous generate_hf, reproduced in `old_generate`).

    PYTHONPATH=src python benchmarks/memory_scaling.py            # the table quoted in docs/training.md
    PYTHONPATH=src python benchmarks/memory_scaling.py --lengths 1024 2048 --old-at 2048   # quicker
    PYTHONPATH=src python benchmarks/memory_scaling.py --jobs update score --lengths 1024 4096   # some rows
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import types

import torch

V, PROMPT, BATCH, BUDGET = 151_936, 64, 1, 16_640


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_model(seed: int, hidden: int = 64, layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=V, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=20_000,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=V - 1)
    return Qwen3ForCausalLM(config).eval()


def batch(L: int, K: int = 16):
    """Rollouts of BATCH sequences (PROMPT + L tokens) with random stored data, and their scores' shapes."""
    from opd.engines.rollout import Rollouts

    gen = torch.Generator().manual_seed(0)
    N = BATCH * L
    tensors = {"offsets_B1": torch.arange(BATCH + 1) * L, "tokens_N": torch.randint(1, V - 1, (N,), generator=gen),
               "s_logprob_N": -torch.rand(N, generator=gen) * 12, "s_topk_ids_NK": torch.randint(0, V, (N, K), generator=gen),
               "s_topk_logprobs_NK": -torch.rand(N, K, generator=gen) * 12,
               "prompt_offsets_B1": torch.arange(BATCH + 1) * PROMPT,
               "prompt_tokens_P": torch.randint(1, V - 1, (BATCH * PROMPT,), generator=gen)}
    scores = {"t_logprob_N": -torch.rand(N, generator=gen) * 12}
    return Rollouts([str(b) for b in range(BATCH)], tensors), scores


def measure_update(L: int, old: bool) -> float:
    from opd.engines import train, update

    model = build_model(1)
    rollouts, scores = batch(L)
    args = train.parse_args(["--student", "-", "--teacher", "-", "--prompts", "-", "--out-dir", "-", "--method", "full",
                             "--world", "miniature"])
    train.check_args(args)  # fills the method's defaults (--aggregation, --signal-*)
    args.max_tokens_per_microbatch, args.logit_chunk = (10**9, 10**9) if old else (BUDGET, None)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tr = types.SimpleNamespace(args=args, student=model, ddp=None, device=torch.device("cpu"), optimizer=opt,
                               scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                               dist=train.distributed.Context(), rollout_weights_stale=False)
    mask_BT = torch.ones(BATCH, L, dtype=torch.bool)
    base = rss_mb()
    update.update_step(tr, rollouts, scores, mask_BT, step=1)
    return peak_mb() - base


def measure_score(L: int, old: bool) -> float:
    from opd.engines.score import score_rollouts

    teacher, student = build_model(2), build_model(3)
    rollouts, _ = batch(L)
    chunk, budget = (10**9, 10**9) if old else (None, BUDGET)
    base = rss_mb()
    score_rollouts(teacher, rollouts, 16, BATCH, student=student, logit_chunk=chunk, max_tokens=budget)
    return peak_mb() - base


@torch.no_grad()
def old_generate(model, prompts, K: int, L: int):
    """The previous generate_hf's memory behaviour: every step's [B, V] logits kept, stacked to [B, T, V]."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=L, do_sample=False, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0, eos_token_id=V - 1)
    out = model.generate(input_ids=torch.tensor(prompts), generation_config=config)
    logp_BTV = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    return logp_BTV.topk(K, dim=-1), logp_BTV.gather(-1, out.sequences[:, -L:, None])


def measure_rollout(L: int, old: bool) -> float:
    from opd.engines.rollout import generate_hf

    model = build_model(4)
    prompts = torch.randint(1, V - 1, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    tok = types.SimpleNamespace(eos_token_id=V - 1, pad_token_id=0)
    model.generation_config.min_new_tokens = L  # every response runs to L tokens: no early EOS
    base = rss_mb()
    if old:
        old_generate(model, prompts, 16, L)
    else:
        generate_hf(model, tok, prompts, 16, 0.0, 1.0, L, seed=0, batch_size=BATCH)
    return peak_mb() - base


MEASURES = {"update": measure_update, "score": measure_score, "rollout": measure_rollout}


def run_one(kind: str, L: int, old: bool, threads: int) -> float:
    cmd = [sys.executable, __file__, "--one", kind, str(L), "old" if old else "new", "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    peak = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    print(f"{kind} L={L} {'old' if old else 'new'}: {peak:.0f} MB", file=sys.stderr, flush=True)  # as it goes
    return peak


def table(jobs: list[str], lengths: list[int], rollout_max: int, old_at: int, threads: int) -> dict:
    rows = {}
    for kind in jobs:
        ls = [L for L in lengths if kind != "rollout" or L <= rollout_max]
        rows[kind] = {"new": {L: run_one(kind, L, False, threads) for L in ls},
                      "old": {old_at: run_one(kind, old_at, True, threads)}}
    return rows


def report(rows: dict, old_at: int) -> None:
    lengths = sorted({L for r in rows.values() for L in r["new"]})
    print("| job | " + " | ".join(f"L={L}" for L in lengths) + f" | old L={old_at} | longest / 1k | new / old at {old_at} |")
    print("|---" * (len(lengths) + 4) + "|")
    for kind, r in rows.items():
        new = r["new"]
        cells = [f"{new[L]:.0f}" if L in new else "" for L in lengths]
        longest = max(new)
        print(f"| {kind} (MB) | " + " | ".join(cells) + f" | {r['old'][old_at]:.0f} | "
              f"{new[longest] / new[min(new)]:.2f} (L={longest}) | {new.get(old_at, float('nan')) / r['old'][old_at]:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="response lengths L of the update and scoring rows")
    p.add_argument("--rollout-max", type=int, default=4096, help="longest rollout measured")
    p.add_argument("--old-at", type=int, default=4096, help="response length of the old-code comparison")
    p.add_argument("--jobs", nargs="+", choices=list(MEASURES), default=list(MEASURES), help="rows to measure")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--one", nargs=3, metavar=("KIND", "L", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        kind, L, variant = args.one
        print(json.dumps({"peak_mb": MEASURES[kind](int(L), variant == "old")}))
        return
    rows = table(args.jobs, args.lengths, args.rollout_max, args.old_at, args.threads)
    report(rows, args.old_at)


if __name__ == "__main__":
    main()
