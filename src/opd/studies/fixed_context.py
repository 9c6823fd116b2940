"""TA-OPD's fixed-context diagnostic: which positions, when trained on, move the student most?

Freeze a bank of contexts (prompt + the student's own response). For each selector, start from the
same initial student S0, take τ OPD steps on that selector's positions only (budget ρ, e.g. 4%), then
measure on ALL positions of the same bank

    G_t = KL(p_T ‖ p_S0) − KL(p_T ‖ p_Sτ)     (forward KL, full vocabulary)

Reported: the absolute gain (paper) — the mean of G_t — and the relative gain of the official code,
(mean base − mean new) / mean base; plus the gain on the selected positions alone. `gain` repeats the one
the signal variant names (`signals.gain`: absolute for the paper, relative for the official code), and the
signals, the selection and the τ steps' loss aggregation follow the variant too (`--signal-variant`).

GPU memory: the teacher is needed only for the bank's KL, so it waits on the host during each selector's
τ steps, and S0 (only the source of each selector's copy once its base KL is known) stays there: the τ
steps hold one student with its gradients and AdamW state, the KL passes the teacher and one student
(opd.studies.plan's two phases of this job). `--gradient-checkpointing` recomputes the trained copy's
layers in backward, as in training. On the CPU the moves are no-ops.

A pair across chat templates (opd.engines.pairing): the teacher reads the bank in its own ids (its prompts,
the mapped responses), and its distribution, restricted to the ids the student reads and renormalised
there, is the p_T of the KL.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from opd.infra import cli, modeldirs
from opd.infra.io import write_rows_csv
from opd.math.loss import forward_kl_full, opd_loss
from opd.engines.rollout import Rollouts
from opd.engines import accel, forward
from opd.engines.score import JOB_FLAGS, add_job_args, load_scores, start_job
from opd.math.select import SELECTORS, select_mask
from opd.engines.signals import add_signal_args, batch_signals, resolve_signal_args, selection_kwargs, signal_flags
from opd.math.variant import PAPER, SignalOptions


@dataclasses.dataclass
class Bank:
    """The frozen contexts, and how a pass over them is split (memory bounds of opd.engines.forward)."""
    seqs: list[tuple[list[int], list[int]]]
    chunk: int | None  # LM-head positions per chunk (None: forward.chunk_positions' default)
    max_tokens: int  # padded tokens per forward pass
    teacher_seqs: list[tuple[list[int], list[int]]] | None = None  # a cross-template teacher's reading of seqs
    s2t: Tensor | None = None  # with it: student id -> teacher id (-1: none), opd.engines.pairing

    def batches(self) -> list[list[int]]:
        return forward.token_batches([len(p) + len(r) for p, r in self.seqs], self.max_tokens, flag=forward.BUDGET_FLAG)

    def part(self, rows: list[int], teacher: bool = False) -> tuple[list[list[int]], list[list[int]]]:
        seqs = self.teacher_seqs if teacher and self.teacher_seqs is not None else self.seqs
        return [seqs[i][0] for i in rows], [seqs[i][1] for i in rows]


def _forward_kl(s_logp_CV: Tensor, t_logp_CV: Tensor) -> tuple[Tensor]:
    """KL(p_T ‖ p_S) per position (head_map passes the mapped model's log-probs first)."""
    return (forward_kl_full(t_logp_CV, s_logp_CV),)


def _forward_kl_on_shared(s_logp_CV: Tensor, t_logp_CV: Tensor) -> tuple[Tensor]:
    """The same where p_T is 0 on some ids (a cross-template teacher): those terms are 0, not 0·(−inf)."""
    p_CV = t_logp_CV.exp()
    return (torch.where(p_CV > 0, p_CV * (t_logp_CV - s_logp_CV), 0.0).sum(-1),)


def teacher_on_student_ids(t_logp_CV: Tensor, s2t: Tensor, student_vocab: int) -> Tensor:
    """A cross-template teacher's log-probs in the student's columns: −inf where the teacher has no reading of
    the student's id, renormalised over the ids it reads (its turn markers and padding rows left out)."""
    from opd.engines.pairing import map_ids

    cols_V = map_ids(torch.arange(student_vocab), s2t).to(t_logp_CV.device)
    on_s_CV = t_logp_CV.gather(-1, cols_V.clamp(min=0).expand(len(t_logp_CV), -1))
    on_s_CV = on_s_CV.masked_fill(cols_V < 0, float("-inf"))
    return on_s_CV - torch.logsumexp(on_s_CV, dim=-1, keepdim=True)


@torch.no_grad()
def bank_forward_kl(teacher, model, bank: Bank) -> Tensor:
    """KL(p_T ‖ p_model) over the full vocabulary at every response position of the bank: kl_N.

    Both models' hidden states for one batch of sequences, then both LM heads a chunk at a time: never
    more than a chunk of [positions, V] log-probs per model.
    """
    parts = []
    for rows in bank.batches():
        prompts, responses = bank.part(rows)
        t_hidden_NH = forward.response_hidden(teacher, *bank.part(rows, teacher=True))
        s_hidden_NH = forward.response_hidden(model, prompts, responses)
        chunk = forward.chunk_positions(bank.chunk, teacher.lm_head.out_features)
        for lo in range(0, len(t_hidden_NH), chunk):
            t_logp_CV = torch.log_softmax(teacher.lm_head(t_hidden_NH[lo:lo + chunk]).float(), -1)
            fn = _forward_kl
            if bank.s2t is not None:  # a cross-template teacher: its distribution on the student's ids
                t_logp_CV = teacher_on_student_ids(t_logp_CV, bank.s2t, model.lm_head.out_features)
                fn = _forward_kl_on_shared
            (kl_C,), _ = forward.head_map(model.lm_head, s_hidden_NH[lo:lo + chunk], fn, (t_logp_CV,), chunk)
            parts.append(kl_C.cpu())
    return torch.cat(parts)


def _masked_batches(bank: Bank, mask_N: Tensor):
    """(prompts, responses, their slice of the flat positions, keep_N) per batch of the bank with a masked position."""
    start, out = 0, []
    for rows in bank.batches():
        prompts, responses = bank.part(rows)
        flat = slice(start, start + sum(map(len, responses)))
        start = flat.stop
        if bool(mask_N[flat].any()):
            out.append((prompts, responses, flat, mask_N[flat]))
    return out


def sampled_logprob(model, bank: Bank, prompts, responses, keep_N: Tensor, tokens_M: Tensor) -> Tensor:
    """log p(y_t) at the kept positions of one batch, with gradients (LM head only where kept, chunked)."""
    chunk = forward.chunk_positions(bank.chunk, model.lm_head.out_features)
    (logprob_M,), _ = forward.supervised_map(model, prompts, responses, keep_N, forward.sampled_logprob, (tokens_M,),
                                             chunk)
    return logprob_M


def _seq_index(responses, keep_N: Tensor) -> Tensor:
    """The batch-local sequence of each kept position (for the per-sequence aggregation)."""
    lengths_B = torch.tensor([len(r) for r in responses])
    return torch.repeat_interleave(torch.arange(len(responses)), lengths_B)[keep_N.cpu()]


def opd_steps(model, bank: Bank, tokens_N: Tensor, mask_N: Tensor, t_logprob_N: Tensor, steps: int,
              lr: float, clip_eps: float, device: torch.device, dtype: str, aggregation: str = "token_mean") -> None:
    """τ OPD updates of `model` in place on the masked positions of a frozen bank.

    Each step accumulates the gradient batch by batch (forward, backward, free), each batch's loss
    weighted by its share of the masked positions (token_mean) or of the sequences with one
    (sequence_mean): exactly the whole bank's loss (a single batch, as before, when the bank fits).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = _masked_batches(bank, mask_N)
    with torch.no_grad(), accel.autocast(device, dtype):
        old = [sampled_logprob(model, bank, p, r, keep, tokens_N[flat][keep]) for p, r, flat, keep in batches]
    seq_index = [_seq_index(r, keep) for _, r, _, keep in batches]
    share = ([len(s) for s in seq_index] if aggregation == "token_mean" else [len(s.unique()) for s in seq_index])
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for (prompts, responses, flat, keep_N), old_M, seq_M, n in zip(batches, old, seq_index, share):
            with accel.autocast(device, dtype):
                new_M = sampled_logprob(model, bank, prompts, responses, keep_N, tokens_N[flat][keep_N])
            t_M = t_logprob_N[flat][keep_N].to(new_M.device)
            loss = opd_loss(new_M, old_M, t_M, torch.ones_like(new_M, dtype=torch.bool), clip_eps, aggregation,
                            seq_M.to(new_M.device))
            (loss * (n / sum(share)) if len(batches) > 1 else loss).backward()
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


def trained_copy(student, device: torch.device, checkpointing: bool):
    """A copy of S0 on `device` in training mode (S0 itself may wait on the host), layers checkpointed if asked."""
    model = copy.deepcopy(student).to(device).train()
    if checkpointing:
        forward.enable_checkpointing(model)
    return model


def run_bank(student, teacher, bank: Bank, rollouts: Rollouts, scores: dict, args: argparse.Namespace,
             device: torch.device, opts: SignalOptions = PAPER) -> list[dict]:
    """One row per selector: its budget, positions kept and gains on the frozen bank (the bank is one
    rollout batch: the official random stream's counter is 0). Moves S0 to the host (module docstring)."""
    tokens_N = rollouts.tensors["tokens_N"].long()
    host = torch.device("cpu")
    with accel.autocast(device, args.dtype):
        base_N = bank_forward_kl(teacher, student, bank)
    student.to(host)
    sig = batch_signals(rollouts.tensors, scores, opts)
    rows = []
    for name in args.selectors:
        mask_N = select_mask(name, sig.for_selection(), args.ratio, seed=args.seed, **selection_kwargs(opts))[sig.valid_BT]
        teacher.to(host)
        model = trained_copy(student, device, args.gradient_checkpointing)
        torch.manual_seed(args.seed)
        opd_steps(model, bank, tokens_N, mask_N, scores["t_logprob_N"], args.steps, args.lr, args.clip_eps, device,
                  args.dtype, opts.aggregation)
        model.zero_grad(set_to_none=True)  # the KL pass needs no gradients: room for the teacher
        teacher.to(device)
        with accel.autocast(device, args.dtype):
            new_N = bank_forward_kl(teacher, model.eval(), bank)
        del model
        rows.append({"selector": name, "rho": args.ratio if name != "full" else 1.0, "steps": args.steps,
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
    "gradient_checkpointing": "diagnose.gradient_checkpointing",
    **JOB_FLAGS,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the trained copies' decoder layers in backward (the same numbers, less memory)")
    p.add_argument("--name", default="student", help="student name, for tracking")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    add_job_args(p)
    add_signal_args(p)
    return cli.parse(p, argv, FLAGS)


def teacher_view(args: argparse.Namespace, rollouts: Rollouts):
    """The teacher's view of the bank (opd.engines.pairing), None when both read one tokenizer and template."""
    from transformers import AutoTokenizer

    from opd.engines.pairing import generation_end_ids, pair_tokenizers, view_from_meta

    s_tok, t_tok = (AutoTokenizer.from_pretrained(str(d)) for d in (args.student, args.teacher))
    pair = pair_tokenizers(s_tok, t_tok, str(args.student), str(args.teacher), generation_end_ids(args.student))
    return view_from_meta(pair, t_tok, rollouts, args.rollouts)


def main(argv: list[str] | None = None) -> None:
    from opd.infra import tracking

    args = parse_args(argv)
    opts = resolve_signal_args(args)
    device = start_job(args)
    rollouts = Rollouts.load(args.rollouts)
    scores = load_scores(args.scores, rollouts, args.rollouts)
    modeldirs.check_flag_dirs(args, "student", "teacher")
    bank = Bank(rollouts.sequences(), args.logit_chunk, args.max_tokens_per_microbatch)
    view = teacher_view(args, rollouts)
    if view is not None:  # a pair across chat templates: the teacher reads the bank in its own ids
        bank = dataclasses.replace(bank, teacher_seqs=view.rollouts(rollouts).sequences(), s2t=view.pair.s2t)
    # The student is trained (τ steps): fp32 master weights under autocast, as in opd.engines.train.
    student = forward.load_model(args.student, device, torch.float32)
    teacher = forward.load_model(args.teacher, device, accel.teacher_dtype(args.dtype))
    with tracking.run(args.study, f"fixed_context[{args.name}]", params=vars(args), tags={"model": args.name}) as run:
        rows = run_bank(student, teacher, bank, rollouts, scores, args, device, opts)
        write_rows_csv(args.out, rows)
        run.log_metrics({f"{r['selector']}.{k}": r[k] for r in rows for k in ("gain_abs", "gain_rel")})
        run.log_artifact(args.out)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    cli.run(main)
