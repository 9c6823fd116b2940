"""Optimizer, schedule and clip-higher from flags and config (opd.engines.optim, issue 20), by hand."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from opd.engines import checkpoint, optim, train
from opd.infra import cli
from opd.infra.config import ConfigError, load_schema, load_yaml, validate_config
from opd.math.loss import opd_loss, ppo_clip_terms


def study(**train_keys) -> dict:
    """The default study config with these `train` keys, validated (defaults filled in)."""
    config = load_yaml(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    config["train"] = {**config.get("train", {}), **train_keys}
    return validate_config(config)


def clip_case(ratio: float, high: float | None) -> tuple[float, float]:
    """(loss, d loss / d log p_new) of one token with advantage +1 at this ratio, clip_eps 0.2."""
    new = torch.tensor([math.log(ratio)], requires_grad=True)
    term = ppo_clip_terms(new, torch.zeros(1), torch.ones(1), clip_eps=0.2, clip_eps_high=high)
    term.sum().backward()
    return term.item(), new.grad.item()


def test_clip_higher_keeps_the_gradient_of_a_positive_advantage_up_to_one_plus_eps_high():
    # ratio 1.25, A = +1: in [0.8, 1.28] it is unclipped, ℓ = −1.25 and dℓ/dlog p = −ratio·A = −1.25 ...
    assert clip_case(1.25, 0.28) == pytest.approx((-1.25, -1.25))
    # ... under the symmetric 0.2 the clipped 1.2 wins the min: ℓ = −1.2, a constant, no gradient.
    assert clip_case(1.25, None) == pytest.approx((-1.2, 0.0))
    assert clip_case(1.25, 0.2) == pytest.approx((-1.2, 0.0))
    # ratio 1.3 is above 1.28: clipped there, ℓ = −1.28, no gradient.
    assert clip_case(1.3, 0.28) == pytest.approx((-1.28, 0.0))
    # The lower clip is 1 − clip_eps whatever clip_eps_high: ratio 0.7, A = −1 -> min(−0.7, −0.8) = −0.8.
    new = torch.tensor([math.log(0.7)])
    assert ppo_clip_terms(new, torch.zeros(1), -torch.ones(1), 0.2, 0.28).item() == pytest.approx(0.8)


def test_symmetric_default_is_the_old_loss_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    new, old, t = (torch.randn(50, generator=g) for _ in range(3))
    mask = torch.rand(50, generator=g) > 0.3
    assert torch.equal(opd_loss(new, old, t, mask, 0.2), opd_loss(new, old, t, mask, 0.2, clip_eps_high=0.2))


def test_an_upper_clip_below_the_lower_one_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="clip_eps_high 0.1 < clip_eps 0.2"):
        ppo_clip_terms(torch.zeros(1), torch.zeros(1), torch.ones(1), 0.2, 0.1)
    with pytest.raises(ConfigError, match=r"train.clip_eps_high: 0.1 is below train.clip_eps 0.2"):
        study(clip_eps=0.2, clip_eps_high=0.1)
    args = argparse.Namespace(clip_eps=0.2, clip_eps_high=0.1)
    with pytest.raises(ValueError, match=r"--clip-eps-high \(train.clip_eps_high\) 0.1 < --clip-eps"):
        optim.check_args(args)


def args_for(*flags: str) -> argparse.Namespace:
    p = cli.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--clip-eps-high", type=float, default=None)
    optim.add_args(p)
    return p.parse_args(list(flags))


def one_step(args: argparse.Namespace, grads: list[float], p0: float = 1.0) -> float:
    """The parameter after one optimizer step per gradient (a single scalar parameter)."""
    p = torch.nn.Parameter(torch.tensor([p0]))
    opt, _ = optim.build([p], args)
    for g in grads:
        p.grad = torch.tensor([g])
        opt.step()
    return p.item()


def test_weight_decay_and_betas_reach_the_optimizer():
    args = args_for("--weight-decay", "0.1", "--betas", "0.9", "0.98", "--lr-schedule", "constant")
    opt, _ = optim.build([torch.nn.Parameter(torch.zeros(1))], args)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.1, (0.9, 0.98), 1e-8)
    # p = 1, g = 0.5, lr 0.1, wd 0.1. Bias-corrected first step: m̂ = g, v̂ = g², so the Adam step is lr·g/|g| = lr.
    # adamw (decoupled): p·(1 − lr·wd) − lr = 0.99 − 0.1 = 0.89; adam (L2): g + wd·p = 0.6, same step: 1 − 0.1 = 0.9.
    assert one_step(args, [0.5]) == pytest.approx(0.89, abs=1e-6)
    adam = args_for("--optimizer", "adam", "--weight-decay", "0.1", "--lr-schedule", "constant")
    assert one_step(adam, [0.5]) == pytest.approx(0.9, abs=1e-6)
    # β2 shows on the second step: g = 1 then 0, no decay. m̂2 = β1(1−β1)/(1−β1²) = 0.09/0.19,
    # v̂2 = β2(1−β2)/(1−β2²) = β2/(1+β2): the second step is lr·m̂2/√v̂2 after the first step of lr.
    for b2 in (0.98, 0.999):
        a = args_for("--weight-decay", "0", "--betas", "0.9", str(b2), "--lr-schedule", "constant")
        expected = 1.0 - 0.1 - 0.1 * (0.09 / 0.19) / math.sqrt(b2 / (1 + b2))
        assert one_step(a, [1.0, 0.0]) == pytest.approx(expected, abs=1e-6)
    assert expected != pytest.approx(1.0 - 0.1 - 0.1 * (0.09 / 0.19) / math.sqrt(0.98 / 1.98), abs=1e-4)


def test_schedules_and_resolved_record():
    warm, const = args_for(), args_for("--lr-schedule", "constant")
    lrs = []
    for a in (warm, const):
        opt, sched = optim.build([torch.nn.Parameter(torch.zeros(1))], a)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1 / 2, 0.1])  # warm-up over 40 // 20 = 2 steps: half the lr at step 1
    rec = optim.record(args_for("--clip-eps-high", "0.28", "--betas", "0.9", "0.98"))
    assert rec["train.clip_eps_high"] == 0.28 and rec["train.optimizer.betas"] == [0.9, 0.98]
    assert optim.record(args_for())["train.clip_eps_high"] == 0.2  # resolved: the symmetric clip


def test_defaults_match_the_schema_and_give_no_new_flags():
    train_schema = load_schema()["properties"]["train"]["properties"]
    assert train_schema["optimizer"]["default"] == optim.OPTIMIZER_DEFAULTS
    assert optim.config_flags(study()["train"]) == []  # an unchanged command line: no run re-runs
    script = study(optimizer={"weight_decay": 0.1, "betas": [0.9, 0.98]}, lr_schedule="constant", clip_eps_high=0.28)
    assert script["train"]["optimizer"] == {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-8}
    assert optim.config_flags(script["train"]) == ["--weight-decay 0.1", "--betas 0.9 0.98", "--lr-schedule constant",
                                                   "--clip-eps-high 0.28"]
    flags = args_for("--weight-decay", "0.1", "--betas", "0.9", "0.98", "--lr-schedule", "constant",
                     "--clip-eps-high", "0.28")
    assert cli.flag_problems(flags, optim.FLAGS) == []
    assert cli.flag_problems(args_for("--weight-decay", "-1"), optim.FLAGS) == [
        "--weight-decay: -1.0 is out of range; allowed: [0, 1] (config train.optimizer.weight_decay)"]
    assert cli.flag_problems(args_for("--betas", "0.9", "1.0"), optim.FLAGS)[0].startswith("--betas")


def test_checkpoints_written_before_the_flags_resume_with_their_defaults():
    parsed = args_for()
    flags = {k: str(v) for k, v in vars(parsed).items() if k in checkpoint.ADDED_FLAG_DEFAULTS}
    assert flags == {k: v for k, v in checkpoint.ADDED_FLAG_DEFAULTS.items() if k in flags}
    assert set(flags) == set(optim.DEFAULTS) | {"clip_eps_high"}
    older = {"flags": {k: v for k, v in checkpoint._resume_flags(parsed).items() if k not in flags}}
    assert checkpoint.changed_flags(parsed, older) == []
    assert checkpoint.changed_flags(args_for("--lr-schedule", "constant"), older) == ["lr_schedule"]


def test_a_run_trains_and_records_the_script_optimizer(tiny_world, tmp_path):
    out = tmp_path / "out"
    final = train.main(["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
                        "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(out),
                        "--method", "full", "--steps", "1", "--prompts-per-step", "2", "--samples", "1",
                        "--max-new-tokens", "8", "--top-k", "4", "--study", "test_optim",
                        "--weight-decay", "0.1", "--betas", "0.9", "0.98", "--lr-schedule", "constant",
                        "--clip-eps-high", "0.28", "--lr", "1e-6"])
    assert final["lr"] == 1e-6  # constant: no warm-up at step 1
    assert final["optimizer"]["train.optimizer.weight_decay"] == 0.1
    assert json.loads((out / "metrics.json").read_text())["optimizer"]["train.clip_eps_high"] == 0.28
    group = checkpoint.load_latest_checkpoint(out)["trainer"]["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.1, (0.9, 0.98))
