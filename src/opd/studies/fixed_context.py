"""TA-OPD's fixed-context diagnostic: which positions, when trained on, move the student most?

Freeze a bank of contexts (prompt + the student's own response). For each selector, start from the
same initial student S0, take τ OPD steps on that selector's positions only (budget ρ, e.g. 4%), then
measure on ALL positions of the same bank

    G_t = KL(p_T ‖ p_S0) − KL(p_T ‖ p_Sτ)     (forward KL, full vocabulary)

Reported: the absolute gain (paper) — the mean of G_t — and the relative gain of the official code,
(mean base − mean new) / mean base; plus the gain on the selected positions alone. `gain` repeats the one
the signal variant names (`signals.gain`: absolute for the paper, relative for the official code), and the
signals, the selection and the τ steps' loss aggregation follow the variant too (`--signal-variant`).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import Tensor

from opd.infra import cli, modeldirs
from opd.infra.io import write_rows_csv
from opd.math.loss import forward_kl_full, opd_loss
from opd.engines.rollout import Rollouts
from opd.engines.score import load_scores, response_logits
from opd.math.select import SELECTORS, select_mask
from opd.engines.signals import add_signal_args, batch_signals, resolve_signal_args, selection_kwargs, signal_flags
from opd.math.variant import PAPER, SignalOptions


@torch.no_grad()
def bank_logprobs(model, seqs) -> Tensor:
    """log p over the vocabulary at every response position of the bank: logp_NV."""
    return torch.log_softmax(response_logits(model, [p for p, _ in seqs], [r for _, r in seqs]).float(), -1)


def sampled_logprob(model, seqs, tokens_N: Tensor, keep_N: Tensor) -> Tensor:
    """log p_S(y_t) at the kept positions, with gradients (LM head only where kept)."""
    logits_MV = response_logits(model, [p for p, _ in seqs], [r for _, r in seqs], keep_N)
    return torch.log_softmax(logits_MV.float(), -1).gather(-1, tokens_N[keep_N][:, None])[:, 0]


def opd_steps(model, seqs, tokens_N: Tensor, mask_N: Tensor, t_logprob_N: Tensor, steps: int,
              lr: float, clip_eps: float, aggregation: str = "token_mean") -> None:
    """τ OPD updates of `model` in place on the masked positions of a frozen bank."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        old_M = sampled_logprob(model, seqs, tokens_N, mask_N)
    t_M = t_logprob_N[mask_N]
    lengths_B = torch.tensor([len(r) for _, r in seqs])
    seq_index_M = torch.repeat_interleave(torch.arange(len(seqs)), lengths_B)[mask_N]
    for _ in range(steps):
        new_M = sampled_logprob(model, seqs, tokens_N, mask_N)
        loss = opd_loss(new_M, old_M, t_M, torch.ones_like(new_M, dtype=torch.bool), clip_eps, aggregation,
                        seq_index_M)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def gains(base_N: Tensor, new_N: Tensor, mask_N: Tensor, gain: str = "absolute") -> dict[str, float]:
    """Absolute gain (mean G_t over all positions), relative gain (code), gain on selected positions;
    `gain` = the one the variant reports ("absolute" or "relative")."""
    base, new = float(base_N.mean()), float(new_N.mean())
    rel = (base - new) / base if base > 0 else float("nan")
    return {
        "gain": base - new if gain == "absolute" else rel,
        "gain_abs": base - new,
        "gain_rel": rel,
        "gain_abs_selected": float((base_N - new_N)[mask_N].mean()) if bool(mask_N.any()) else float("nan"),
        "kl_base": base,
        "kl_after": new,
    }


def run_bank(student, teacher, rollouts: Rollouts, scores: dict, selectors: list[str], rho: float,
             steps: int, lr: float, clip_eps: float, seed: int, opts: SignalOptions = PAPER) -> list[dict]:
    """One row per selector: its budget, positions kept and gains on the frozen bank (the bank is one
    rollout batch: the official random stream's counter is 0)."""
    seqs = rollouts.sequences()
    tokens_N = rollouts.tensors["tokens_N"].long()
    t_logp_NV = bank_logprobs(teacher, seqs)
    base_N = forward_kl_full(t_logp_NV, bank_logprobs(student, seqs))
    sig = batch_signals(rollouts.tensors, scores, opts)
    rows = []
    for name in selectors:
        mask_N = select_mask(name, sig.for_selection(), rho, seed=seed, **selection_kwargs(opts))[sig.valid_BT]
        model = copy.deepcopy(student).train()
        torch.manual_seed(seed)
        opd_steps(model, seqs, tokens_N, mask_N, scores["t_logprob_N"], steps, lr, clip_eps, opts.aggregation)
        new_N = forward_kl_full(t_logp_NV, bank_logprobs(model.eval(), seqs))
        rows.append({"selector": name, "rho": rho if name != "full" else 1.0, "steps": steps,
                     "n_selected": int(mask_N.sum()), "n_positions": int(mask_N.numel()),
                     **gains(base_N, new_N, mask_N, opts.gain)})
    return rows


FLAGS = {  # flag -> the config key it stands for (opd.infra.cli); one line per flag
    "selectors": "diagnose.fixed_context.selectors",
    "ratio": "diagnose.fixed_context.ratio",
    "steps": "diagnose.fixed_context.steps",
    "lr": "diagnose.fixed_context.lr",
    "clip_eps": "train.clip_eps",
    **signal_flags(),
    "seed": "seed",
}


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser(description="Fixed-context gain of each selector (TA-OPD diagnostic).")
    p.add_argument("--rollouts", type=Path, required=True, help="the frozen context bank (rollouts file)")
    p.add_argument("--scores", type=Path, required=True, help="teacher scores of those rollouts")
    p.add_argument("--student", type=Path, required=True, help="initial student S0")
    p.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    p.add_argument("--out", type=Path, required=True, help="CSV to write, one row per selector")
    p.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=SELECTORS, help="selectors")
    p.add_argument("--ratio", type=float, default=0.04, help="budget ρ (fraction of positions)")
    p.add_argument("--steps", type=int, default=5, help="τ: OPD steps on the bank")
    p.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate of the τ steps")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range ε")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selector and of training")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default="student", help="student name, for tracking")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    add_signal_args(p)
    args = cli.validate(p.parse_args(argv), FLAGS)
    opts = resolve_signal_args(args)
    from transformers import AutoModelForCausalLM

    from opd.infra import tracking

    torch.set_num_threads(args.threads)
    rollouts = Rollouts.load(args.rollouts)
    scores = load_scores(args.scores, rollouts, args.rollouts)
    modeldirs.check_flag_dirs(args, "student", "teacher")
    student = AutoModelForCausalLM.from_pretrained(str(args.student)).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(args.teacher)).eval()
    with tracking.run(args.study, f"fixed_context[{args.name}]", params=vars(args), tags={"model": args.name}) as run:
        rows = run_bank(student, teacher, rollouts, scores, args.selectors, args.ratio, args.steps, args.lr,
                        args.clip_eps, args.seed, opts)
        write_rows_csv(args.out, rows)
        run.log_metrics({f"{r['selector']}.{k}": r[k] for r in rows for k in ("gain_abs", "gain_rel")})
        run.log_artifact(args.out)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    cli.run(main)
