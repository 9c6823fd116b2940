"""On-policy distillation in process: sample from the current student, score with the teacher, mask, update.

Step t (1-based) depends only on (--seed, t) and the student's weights and optimizer state (prompts drawn
and sampling both seeded with seed·1_000_003 + t, so different seeds never share a stream): a resumed run
replays an uninterrupted one exactly.
Steps call the functions the standalone stages call, so training and the diagnostic study see the same
numbers. Methods: `full`; another selector of `opd.math.select` at budget ρ; `release` (tokens before each
rollout's release point); `release+ta_opd` (ta_opd at budget ρ among pre-release tokens only).
Checkpoints OUT/checkpoints/step_{t:06d}/ (model.pt, trainer.pt, state.json) are written to a hidden
temporary directory and renamed: a directory under its final name is always complete.
The update (micro-batches under a token budget, the chunked LM head, gradient checkpointing of the trunk):
`opd.engines.update`. Under `torchrun --nproc_per_node=N -m opd.engines.train`: data-parallel DDP training, see `opd.engines.distributed`.
Device and precision (`--device`, `--dtype`): `opd.engines.accel`; rollouts from a persistent vLLM engine
(`--rollout-backend vllm`): `opd.engines.vllm_engine`; prompt text (`--prompt-format`): `opd.worlds.prompts`;
rollouts sampled one step ahead, during the update (`--async-rollouts 1`): `opd.engines.async_rollouts`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opd import worlds
from opd.engines import accel, async_rollouts, distributed, forward, optim, recompute, teacher_server, teacher_worker
from opd.engines import vllm_engine as engine
from opd.engines.checkpoint import (KEEP_CHECKPOINTS, changed_flags, load_latest_checkpoint, prune_finished,
                                    restore_rng_states, save_checkpoint, set_aside_replaced)
from opd.engines.rollout import Rollouts, generate_hf
from opd.engines.pairing import PromptBook, generation_end_ids, pair_tokenizers
from opd.engines.signals import (RELEASE_FLAGS, BatchSignals, add_release_args, add_signal_args, batch_signals,
                                release_indices, release_rule, resolve_signal_args, selection_kwargs, signal_flags,
                                signal_options, signal_record)
from opd.infra import cli, modeldirs
from opd.engines.update import update_step
from opd.infra.io import read_prompts, save_model_dir, write_json
from opd.math.loss import DISTRIBUTION_LOSSES
from opd.math.release import ReleaseRule, release_mask
from opd.math.select import SELECTORS, select_mask

RELEASE_METHODS = ("release", "release+ta_opd")
METHODS = SELECTORS + RELEASE_METHODS


@dataclasses.dataclass
class Trainer:
    """Everything a step needs; the student, optimizer and scheduler change in place."""
    args: argparse.Namespace
    world: worlds.World  # prompt template and answer checker of the study's data
    student: Any
    teacher: Any
    tokenizer: Any
    records: list[dict]
    prompt_ids: list[list[int]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: distributed.Context = distributed.Context()
    ddp: Any = None  # the DDP- or FSDP-wrapped `distributed.MaskedLogits(student)` when world > 1
    device: torch.device = torch.device("cpu")
    engine: Any = None  # an `opd.engine.VllmEngine` with --rollout-backend vllm, while training runs
    rollout_weights_stale: bool = True  # the engine still has weights older than the student's
    replica: Any = None  # --sharding fsdp: the unsharded student that rollouts and scoring use
    replica_step: int = -1  # the scheduler step whose weights the replica holds
    engine_metrics: dict = dataclasses.field(default_factory=dict)  # the last push's and recompute's figures
    ahead: Any = None  # --async-rollouts 1: an `opd.engines.async_rollouts.RolloutsAhead` while training runs
    prompt_book: PromptBook | None = None  # a pair across chat templates: the teacher's prompts (opd.engines.pairing)


@dataclasses.dataclass
class StepResult:
    """What one step produced (the tests look at the mask and the release points)."""
    metrics: dict[str, float]
    rollouts: Rollouts
    signals: BatchSignals
    mask_BT: Tensor
    release_B: list[int | None]


# Flags not named as a key of config `train` (those are found by name) -> their config key (opd.infra.cli).
FLAGS = {
    "method": "train.methods[]",
    "top_k": "train.top_k[]",
    "ratio": "train.ratio[]",
    "seed": "train.seeds[]",
    "warmup_steps": cli.NONNEGATIVE,
    "batch_size": cli.POSITIVE,
    "prompt_format": "data.prompt_format",
    **RELEASE_FLAGS, **signal_flags("aggregation"), **optim.FLAGS,
}


def check_args(args: argparse.Namespace, world: int = 1) -> None:
    """Refuse flags that would fail (or silently mean something else) only after the first step."""
    resolve_signal_args(cli.validate(args, FLAGS, section="train"))  # the variant fills unset --signal-*, --aggregation
    distributed.check_share(args.prompts_per_step, world)
    distributed.check_sharding(args.sharding, world)
    release_rule(args)
    optim.check_args(args)
    forward.check_memory_args(args)
    async_rollouts.check_args(args)
    teacher_server.check_args(args)  # --teacher-placement server: a URL, and top-K signals only


def check_fits(args: argparse.Namespace, prompt_ids: list[list[int]]) -> None:
    """The longest prompt plus a full-length response must fit one micro-batch (checked before any step)."""
    longest = max(map(len, prompt_ids)) + args.max_new_tokens
    if longest > args.max_tokens_per_microbatch:
        raise ValueError(f"--max-tokens-per-microbatch (train.max_tokens_per_microbatch) {args.max_tokens_per_microbatch}"
                         f" < the longest prompt ({longest - args.max_new_tokens} tokens) + --max-new-tokens "
                         f"{args.max_new_tokens}: raise it to at least {longest}")


def setup(args: argparse.Namespace, world: worlds.World | None = None,
          ctx: distributed.Context = distributed.Context()) -> Trainer:
    """Check flags, prompts and tokenizers (before anything is written), then load models and optimizer.

    `world` (default: the one `--world` names) renders the prompts and checks the answers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_args(args, ctx.world)
    world = world or worlds.get(args.world)
    records = read_prompts(args.prompts)
    worlds.check_answers(world, records, args.prompts)
    if args.prompts_per_step > len(records):
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} > {len(records)} prompts in {args.prompts}")
    modeldirs.check_flag_dirs(args, "student", "teacher")  # local, before transformers looks at the hub
    tokenizer, t_tokenizer = (AutoTokenizer.from_pretrained(str(d)) for d in (args.student, args.teacher))
    pair = pair_tokenizers(tokenizer, t_tokenizer, str(args.student), str(args.teacher),
                           generation_end_ids(args.student))
    book = PromptBook.build(pair, world, t_tokenizer, records, args.prompt_format, args.enable_thinking)  # None: same
    modeldirs.check_top_k(args.top_k, len(tokenizer), "--top-k", args.student)
    prompt_ids = [world.encode_prompt(tokenizer, r["question"], args.prompt_format, args.enable_thinking)
                  for r in records]
    check_fits(args, prompt_ids + (list(book.prompts.values()) if book else []))
    torch.set_num_threads(args.threads)
    device = accel.resolve_device(args.device)
    # fp32 master weights for the student whatever --dtype says (see opd.engines.accel); a bf16 teacher with bf16.
    student = AutoModelForCausalLM.from_pretrained(str(args.student), dtype=torch.float32).to(device)
    teacher = teacher_worker.in_process_teacher(args, device)  # None with --teacher-placement worker/server
    if args.gradient_checkpointing:
        forward.enable_checkpointing(student)
    ddp, replica = distributed.wrap_student(student, ctx, args.sharding, args.dtype, lambda: AutoModelForCausalLM.
                                            from_pretrained(str(args.student), dtype=accel.teacher_dtype(args.dtype)))
    optimizer, scheduler = optim.build(student.parameters(), args)
    return Trainer(args, world, student, teacher, tokenizer, records, prompt_ids, optimizer, scheduler, ctx, ddp,
                   device, replica=replica, prompt_book=book)


def inference_student(tr: Trainer):
    """The student rollouts, scoring and the saved model read: itself, or under FSDP its unsharded replica
    brought up to the current weights (a collective then: every rank calls this at the same points)."""
    if tr.replica is None:
        return tr.student
    if tr.replica_step != tr.scheduler.last_epoch:
        distributed.refresh_replica(tr.student, tr.replica)
        tr.replica_step = tr.scheduler.last_epoch
    return tr.replica


def sample(tr: Trainer, t: int) -> tuple[Rollouts, list[dict]]:
    """`samples` responses to each of `prompts_per_step` prompts, from the current student."""
    args = tr.args
    gen = torch.Generator().manual_seed(distributed.step_seed(args.seed, t))
    drawn = torch.randperm(len(tr.records), generator=gen)[: args.prompts_per_step].tolist()
    picked = distributed.share(tr.dist, drawn)  # the same draw on every rank: rank r keeps its share
    index = [i for i in picked for _ in range(args.samples)]
    ids = [f"{tr.records[i]['id']}#{j % args.samples}" for j, i in enumerate(index)]
    prompts, seed = [tr.prompt_ids[i] for i in index], distributed.step_seed(args.seed, t, tr.dist.rank)
    if tr.engine is not None:  # vLLM: bring the engine up to the current weights first
        if tr.rollout_weights_stale:
            tr.engine_metrics = tr.engine.push_weights(inference_student(tr), version=t)  # this step's figures
            tr.rollout_weights_stale = False
        tensors = tr.engine.generate(prompts, args.top_k, args.temperature, args.top_p, args.max_new_tokens, seed)
    else:
        student = inference_student(tr)
        student.eval()
        with accel.autocast(tr.device, args.dtype):
            tensors = generate_hf(student, tr.tokenizer, prompts, args.top_k, args.temperature, args.top_p,
                                  args.max_new_tokens, seed=seed, batch_size=args.batch_size)
    return recompute.for_step(tr, Rollouts(ids, tensors), inference_student(tr)), [tr.records[i] for i in index]


def build_mask(method: str, rollouts: Rollouts, sig: BatchSignals, tokenizer, ratio: float, rule: ReleaseRule,
               seed: int, rollout_counter: int = 0) -> tuple[Tensor, list[int | None]]:
    """(mask_BT ⊆ valid_BT supervised, release index per rollout); `rollout_counter` = t − 1 (official random)."""
    kw = selection_kwargs(sig.options, seed, rollout_counter)
    if method not in RELEASE_METHODS:
        return select_mask(method, sig.for_selection(), ratio, **kw), [None] * len(rollouts.ids)
    release_B = release_indices(rollouts, sig, tokenizer, rule)
    pre_BT = release_mask(sig.valid_BT, release_B)
    if method == "release":
        return pre_BT, release_B
    # The released suffix is out of the batch for selection: Norm() quantiles and n = ⌈ρ·N⌉ count
    # pre-release positions only.
    pre_signals = dataclasses.replace(sig.for_selection(), valid_BT=pre_BT)
    return select_mask("ta_opd", pre_signals, ratio, **kw), release_B


def step_metrics(tr: Trainer, rollouts: Rollouts, scores: dict[str, Tensor], records: list[dict],
                 mask_N: Tensor, release_B: list[int | None]) -> dict[str, float]:
    """The per-step metrics that do not depend on the update (all NaN-free)."""
    reverse_kl_N = rollouts.tensors["s_logprob_N"] - scores["t_logprob_N"]
    seqs = rollouts.sequences()
    released = [idx / len(r) for idx, (_, r) in zip(release_B, seqs) if idx is not None]
    texts = [tr.tokenizer.decode(r, skip_special_tokens=True) for _, r in seqs]
    correct = [tr.world.is_correct(text, rec["answer"]) for text, rec in zip(texts, records)]
    return {
        "reverse_kl_all": float(reverse_kl_N.mean()),
        "reverse_kl_supervised": float(reverse_kl_N[mask_N].mean()) if bool(mask_N.any()) else 0.0,
        "frac_supervised": float(mask_N.float().mean()),
        "mean_release_position": sum(released) / len(released) if released else 1.0,
        "train_accuracy": sum(correct) / len(correct),
    }


def run_step(tr: Trainer, t: int) -> StepResult:
    """Training step t: rollouts from the current student, teacher scores, mask, one update."""
    args, start, opts = tr.args, time.perf_counter(), signal_options(tr.args)
    rollouts, records = tr.ahead.rollouts_for(t) if tr.ahead is not None else sample(tr, t)
    with accel.autocast(tr.device, args.dtype):
        scores = teacher_worker.teacher_scores(tr, rollouts, inference_student(tr))  # in process or worker
    sig = batch_signals(rollouts.tensors, scores, opts, args.margin)
    mask_BT, release_B = build_mask(args.method, rollouts, sig, tr.tokenizer, args.ratio, release_rule(args),
                                    seed=distributed.step_seed(args.seed, t, tr.dist.rank), rollout_counter=t - 1)
    lr = tr.optimizer.param_groups[0]["lr"]
    loss = update_step(tr, rollouts, scores, mask_BT, t)
    metrics = {"loss": loss, **step_metrics(tr, rollouts, scores, records, mask_BT[sig.valid_BT], release_B),
               "lr": lr, "tokens_per_second": int(sig.valid_BT.sum()) / (time.perf_counter() - start), **tr.engine_metrics}
    return StepResult(distributed.reduce_metrics(tr.dist, metrics), rollouts, sig, mask_BT, release_B)


def restore(tr: Trainer, ckpt: dict) -> None:
    """Put a checkpoint's weights, optimizer, scheduler and RNG states back; refuse other flags."""
    changed = changed_flags(tr.args, ckpt)
    if changed:
        raise ValueError(f"{ckpt['path']} was written with other flags ({', '.join(changed)}): "
                         f"use another --out-dir or the same flags")
    if ckpt["step"] > tr.args.steps:
        raise ValueError(f"{ckpt['path']} is past --steps {tr.args.steps}")
    distributed.load_states(tr.student, tr.optimizer, ckpt["model"], ckpt["trainer"]["optimizer"],
                            sharded=tr.replica is not None)
    tr.scheduler.load_state_dict(ckpt["trainer"]["scheduler"])
    restore_rng_states(ckpt["trainer"]["rng"])


def train_loop(tr: Trainer, run, start: int, metrics: dict) -> dict:
    """Steps start+1 .. --steps, logging each to MLflow and checkpointing; returns the last metrics."""
    from tqdm import tqdm

    args, ctx = tr.args, tr.dist
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, file=sys.stderr,
               desc=f"opd[{args.method}]", mininterval=2, disable=not ctx.main)
    for t in bar:
        metrics = run_step(tr, t).metrics
        run.log_metrics(metrics, step=t)  # on ranks other than 0, a NoRun
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['reverse_kl_all']:.3f}")
        if t % args.checkpoint_every == 0 or t == args.steps:
            checkpoint_step(tr, t, run.run_id, metrics)
    return metrics


def checkpoint_step(tr: Trainer, t: int, run_id: str, metrics: dict) -> None:
    """Rank 0 writes checkpoint t from CPU copies of the states (it loads on a machine without a GPU)."""
    args, ctx = tr.args, tr.dist
    pending = async_rollouts.stage_pending(tr, t)  # --async-rollouts 1: step t + 1's rollouts go in too
    if tr.replica is not None:  # FSDP: every rank takes part in gathering the full state onto rank 0
        states = distributed.full_states(tr.student, tr.optimizer)
    elif ctx.main:
        states = accel.cpu_state(tr.student), accel.cpu_state(tr.optimizer)
    if ctx.main:
        save_checkpoint(args.out_dir, t, args, *states, tr.scheduler.state_dict(), run_id, metrics,
                        keep=args.keep_checkpoints, extra=pending)
    distributed.barrier(ctx)  # no rank runs ahead of (or exits before) a complete checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="On-policy distillation of a student by a teacher (in process).")
    a = p.add_argument
    a("--student", type=Path, required=True, help="initial student: Hugging Face model directory")
    a("--teacher", type=Path, required=True, help="teacher: Hugging Face model directory (same tokenizer)")
    a("--prompts", type=Path, required=True, help="training prompts, JSONL of {id, question, answer}")
    a("--out-dir", type=Path, required=True, help="checkpoints/, model/ and metrics.json go here")
    a("--method", required=True, help=f"which tokens get the loss: {', '.join(METHODS)}")
    a("--top-k", type=int, default=16, help="K: student/teacher top-K kept per token")
    a("--ratio", type=float, default=0.1, help="selection budget ρ (selectors, release+ta_opd)")
    a("--steps", type=int, default=100, help="optimizer steps")
    a("--prompts-per-step", type=int, default=8, help="prompts drawn per step")
    a("--samples", type=int, default=4, help="responses sampled per prompt")
    a("--max-new-tokens", type=int, default=160, help="longest response")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    a("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    a("--lr", type=float, default=1e-4, help="learning rate (after the warm-up of --lr-schedule warmup)")
    a("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: steps // 20, at least 1)")
    a("--clip-eps", type=float, default=0.2, help="PPO clip range ε: the ratio's lower clip is 1 − ε")
    a("--clip-eps-high", type=float, default=None,
      help="upper clip ε_high (DAPO's clip-higher): the ratio clipped to [1 − ε, 1 + ε_high]; default ε")
    optim.add_args(p)
    a("--loss", default="pg", help=f"pg (the papers: PPO-clip on the sampled-token reverse KL) or "
      f"{', '.join(DISTRIBUTION_LOSSES)} (on the stored top-K)")
    a("--checkpoint-every", type=int, default=50, help="steps between checkpoints (and one at the end)")
    a("--batch-size", type=int, default=64, help="sequences per generate() call and per teacher forward")
    a("--seed", type=int, default=0, help="seed of prompt draws, sampling and the random selector")
    a("--restart-if-flags-changed", action="store_true",
      help="start afresh (old checkpoints renamed aside) instead of refusing checkpoints made with other flags")
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--study", default="miniature", help="MLflow experiment name")
    a("--name", default="student", help="run name for tracking (e.g. the student scale and method)")
    a("--sharding", default="ddp", help=f"under torchrun: {' or '.join(distributed.SHARDINGS)} (FSDP2: weights, "
      "gradients and AdamW state sharded over the ranks; needs WORLD_SIZE > 1)")
    a("--save-dtype", choices=accel.DTYPES, default="float32", help="dtype of the final model/ weights")
    a("--keep-checkpoints", type=int, default=KEEP_CHECKPOINTS,
      help="newest complete checkpoints kept while training; a finished run keeps only its last one")
    accel.add_args(p)
    forward.add_memory_args(p)
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
      help="recompute the student trunk's layers in backward instead of keeping their activations")
    add_release_args(p)
    add_signal_args(p, aggregation_flag="--aggregation")
    worlds.add_args(p)
    engine.add_args(p)
    teacher_worker.add_args(p)
    async_rollouts.add_args(p)
    cli.document(p, FLAGS, section="train")  # the help texts from the table check_args checks with
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from opd.infra import tracking

    args = parse_args(argv)
    world = worlds.get(args.world)
    with accel.session(args.device) as (ctx, _):  # a process group under torchrun (WORLD_SIZE > 1); else one rank
        tr = setup(args, world, ctx)
        ckpt = load_latest_checkpoint(args.out_dir)  # every rank reads the same files
        if ckpt is not None and args.restart_if_flags_changed and changed_flags(args, ckpt):
            if ctx.main:  # a rerun with new settings (e.g. Snakemake after a config change): set aside, the
                set_aside_replaced(args.out_dir)  # previous set-aside copy deleted (disk use stays bounded)
                tracking.mark_killed(ckpt["run_id"])  # no job will resume that run
            distributed.barrier(ctx)
            ckpt = None
        if ckpt is not None:
            restore(tr, ckpt)
        start, metrics = (ckpt["step"], ckpt["metrics"]) if ckpt else (0, {})
        distributed.check_same_step(ctx, start, args.out_dir)
        with distributed.main_only(ctx, lambda: tracking.run(
                args.study, f"train[{args.name}]", params=None if ckpt else {**vars(args), **optim.record(args)},
                tags={"model": args.name, "method": args.method}, run_id=ckpt["run_id"] if ckpt else None,
                resume_step=ckpt["step"] if ckpt else None)) as run, \
                engine.for_trainer(tr), teacher_worker.for_trainer(tr), \
                async_rollouts.for_trainer(tr, sample, ckpt):  # no-ops for hf / in_process / async 0
            metrics = train_loop(tr, run, start, metrics)
            final = {"step": args.steps, **metrics, "signals": signal_record(args), "optimizer": optim.record(args)}
            student = inference_student(tr)
            if ctx.main:
                save_model_dir(student, tr.tokenizer, args.out_dir / "model", dtype=getattr(torch, args.save_dtype))
                prune_finished(args.out_dir)
                write_json(args.out_dir / "metrics.json", final)
        distributed.finish(ctx, student)
    if ctx.main:
        print(json.dumps(final))
    return final


if __name__ == "__main__":
    cli.run(main)
