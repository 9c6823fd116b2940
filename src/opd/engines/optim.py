"""The training optimizer and learning-rate schedule from flags (config `train.optimizer`, `train.lr_schedule`).

- `--optimizer adamw` (default): torch.optim.AdamW, weight decay DECOUPLED from the gradient (Loshchilov &
  Hutter): p ← p − lr·wd·p, then the Adam step. This is also what Megatron-LM's `--optimizer adam` does
  (its Adam applies weight decay decoupled, as AdamW), i.e. the optimizer of TA-OPD's launch script:
  `name: adamw, weight_decay: 0.1, betas: [0.9, 0.98]` reproduces it.
- `--optimizer adam`: torch.optim.Adam, weight decay COUPLED (added to the gradient as an L2 term, so it is
  rescaled by Adam's denominator); the same as adamw when weight decay is 0.
- `--lr-schedule warmup` (default): a linear warm-up over `--warmup-steps` (default steps // 20, at least 1),
  then `--lr`; `constant`: `--lr` from the first step (the launch script's constant schedule).
Defaults are torch's AdamW defaults (weight decay 0.01, betas (0.9, 0.999), eps 1e-8) with the warm-up:
what training did before these flags existed, bit for bit.
"""

from __future__ import annotations

import argparse

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("warmup", "constant")
# The defaults of config train.optimizer (= the schema's, tests/test_optim.py) and the flag of each key.
OPTIMIZER_DEFAULTS = {"name": "adamw", "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}
OPTIMIZER_FLAGS = {"name": "optimizer", "weight_decay": "weight_decay", "betas": "betas", "eps": "adam_eps"}
DEFAULTS = {**{OPTIMIZER_FLAGS[k]: v for k, v in OPTIMIZER_DEFAULTS.items()}, "lr_schedule": "warmup"}
# Flag -> the config key it stands for (opd.infra.cli); --lr-schedule is found by name in config `train`.
FLAGS = {flag: f"train.optimizer.{key}" for key, flag in OPTIMIZER_FLAGS.items()}


def config_flags(train: dict) -> list[str]:
    """The flags of a config `train` block that differ from the defaults (workflow/rules/common.smk): a config
    that does not set them keeps its command line, so its runs are not re-run."""
    opt = {**OPTIMIZER_DEFAULTS, **(train.get("optimizer") or {})}
    out = [f"--{OPTIMIZER_FLAGS[k].replace('_', '-')} {' '.join(map(str, v)) if k == 'betas' else v}"
           for k, v in opt.items() if v != OPTIMIZER_DEFAULTS[k]]
    out += [f"--lr-schedule {train['lr_schedule']}"] if train.get("lr_schedule", "warmup") != "warmup" else []
    out += [f"--clip-eps-high {train['clip_eps_high']}"] if train.get("clip_eps_high") is not None else []
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"],
                   help="adamw: decoupled weight decay (torch AdamW = Megatron's adam); adam: L2 weight decay")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="the optimizer's weight decay")
    p.add_argument("--betas", type=float, nargs=2, default=d["betas"], metavar=("BETA1", "BETA2"),
                   help="Adam's β1 and β2")
    p.add_argument("--adam-eps", type=float, default=d["adam_eps"], help="Adam's ε (added to the denominator)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=d["lr_schedule"],
                   help="warmup: linear warm-up over --warmup-steps, then --lr; constant: --lr from step 1")


def warmup_steps(args: argparse.Namespace) -> int:
    """The warm-up length: --warmup-steps, else steps // 20 (at least 1); 0 with the constant schedule."""
    if args.lr_schedule == "constant":
        return 0
    return args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)


def clip_high(args: argparse.Namespace) -> float:
    """The upper PPO clip ε_high: --clip-eps-high, else --clip-eps (symmetric)."""
    return args.clip_eps if args.clip_eps_high is None else args.clip_eps_high


def check_args(args: argparse.Namespace) -> None:
    if clip_high(args) < args.clip_eps:
        raise ValueError(f"--clip-eps-high (train.clip_eps_high) {args.clip_eps_high} < --clip-eps (train.clip_eps) "
                         f"{args.clip_eps}: the upper clip must not be below the lower one")


def build(params, args: argparse.Namespace):
    """(optimizer, scheduler) of the student's parameters, as the flags say."""
    import torch

    kind = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(params, lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps, weight_decay=args.weight_decay)
    warmup = warmup_steps(args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    return optimizer, scheduler


def record(args: argparse.Namespace) -> dict:
    """The resolved values, under their config keys (MLflow params and metrics.json of a run)."""
    return {"train.optimizer.name": args.optimizer, "train.optimizer.weight_decay": args.weight_decay,
            "train.optimizer.betas": list(args.betas), "train.optimizer.eps": args.adam_eps,
            "train.lr_schedule": args.lr_schedule, "warmup_steps": warmup_steps(args), "train.lr": args.lr,
            "train.clip_eps": args.clip_eps, "train.clip_eps_high": clip_high(args)}
