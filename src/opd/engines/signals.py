"""From stored rollouts + teacher scores to the per-position signals of both papers ([B, T] tensors).

Glue between the compact flat storage (`opd.infra.store`) and the pure math (`opd.math.teachability`); the
diagnostic study and the OPD trainer both call `batch_signals`, so the two always see the same numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opd.engines.rollout import Rollouts, token_char_offsets
from opd.infra import cli
from opd.infra.store import to_padded
from opd.math import teachability as ta
from opd.math import variant
from opd.math.release import SIGMA2_ESTIMATES, ReleaseRule, release_token_index
from opd.math.select import ScoreOptions, Signals


# The release rule's flags -> their config keys (opd.infra.cli; --sigma2 also takes a number: release_rule checks it).
RELEASE_FLAGS = {
    "margin": "release.margin",
    "release_lambda": "release.lambda",
    "min_segments": "release.min_segments",
    "min_prefix_segments": "release.min_prefix_segments",
}


def signal_flags(aggregation_dest: str = "signal_aggregation") -> dict[str, str]:
    """The signal flags -> their config keys (opd.infra.cli): `--signal-<key>` is `signals.<key>`; training's
    aggregation flag is its own `--aggregation`."""
    dests = {"variant": "signal_variant", **{k: f"signal_{k}" for k in variant.KEYS}, "aggregation": aggregation_dest}
    return {dest: f"signals.{key}" for key, dest in dests.items()}


def add_release_args(parser: argparse.ArgumentParser) -> None:
    """The release rule's flags (config `release.*`), shared by opd.engines.train and opd.studies.diagnose."""
    a, d = parser.add_argument, ReleaseRule()
    a("--margin", default="top2", help="teacher margin of the release rule (opd.math.teachability.MARGIN_DEFINITIONS)")
    a("--release-lambda", type=float, default=d.lam, help="release rule: BIC penalty multiplier λ")
    a("--min-segments", type=int, default=d.min_segments, help="release rule: fewest segments for a change-point test")
    a("--min-prefix-segments", type=int, default=d.min_prefix_segments,
      help="release rule: segments always supervised first")
    a("--sigma2", default=d.sigma2, help=f"release rule σ²: {', '.join(SIGMA2_ESTIMATES)}, or a number")


def release_rule(args: argparse.Namespace) -> ReleaseRule:
    """The rule the flags of `add_release_args` describe (ValueError naming --sigma2 if it is bad)."""
    try:
        return ReleaseRule(args.release_lambda, args.min_segments, args.min_prefix_segments, args.sigma2)
    except ValueError as err:
        raise ValueError(f"--{err}") from None


def add_signal_args(parser: argparse.ArgumentParser, aggregation_flag: str = "--signal-aggregation") -> None:
    """`--signal-variant` and one override flag per paper/official difference (config `signals.*`).

    Shared by opd.engines.train, opd.studies.fixed_context and opd.studies.diagnose. An override left unset
    takes the variant's value (opd.math.variant). Training names its loss aggregation `--aggregation`.
    """
    a = parser.add_argument
    a("--signal-variant", default="paper",
      help=f"every paper/official difference at once: {' or '.join(variant.VARIANTS)} (docs/signals.md)")
    for key, allowed in variant.CHOICES.items():
        flag = aggregation_flag if key == "aggregation" else f"--signal-{key.replace('_', '-')}"
        a(flag, default=None, help=f"override of the variant's {key}: {', '.join(allowed)}")
    a("--signal-quantiles", nargs=2, type=float, default=None, metavar=("LO", "HI"),
      help="override of the variant's Norm() quantile pair, e.g. 0.1 1.0")
    a("--signal-norm-eps", type=float, default=None, help="override of the variant's Norm() ε (paper 1e-6, code 0)")


def resolve_signal_args(args: argparse.Namespace) -> variant.SignalOptions:
    """Fill every unset `--signal-*` flag (and `--aggregation`) from the variant, in place, and return them.

    The namespace then holds the resolved values (so MLflow params and checkpoints record them) and
    `signal_overrides`, the keys set against the variant. ValueError names the flag and the allowed values.
    """
    given = {key: getattr(args, f"signal_{key}", None) for key in variant.KEYS}
    if hasattr(args, "aggregation"):
        given["aggregation"] = args.aggregation
    try:
        opts, overridden = variant.resolve(args.signal_variant, **given)
    except ValueError as err:  # "signals.KEY: why" -> "--signal-KEY: why" (or --aggregation)
        key, why = str(err).removeprefix("signals.").split(":", 1)
        flag = "--aggregation" if key == "aggregation" and hasattr(args, "aggregation") else f"--signal-{key}"
        raise cli.FlagError(f"{flag.replace('_', '-')}:{why}") from None
    for key, value in opts.as_dict().items():
        setattr(args, "aggregation" if key == "aggregation" and hasattr(args, "aggregation") else f"signal_{key}",
                value)
    args.signal_overrides = ",".join(overridden)
    return opts


def signal_options(args: argparse.Namespace) -> variant.SignalOptions:
    """The resolved options of a namespace `resolve_signal_args` has filled."""
    values = {key: getattr(args, f"signal_{key}") for key in variant.KEYS if key != "aggregation"}
    values["aggregation"] = getattr(args, "aggregation", None) or getattr(args, "signal_aggregation")
    return variant.SignalOptions(**{**values, "quantiles": tuple(values["quantiles"])})


def signal_record(args: argparse.Namespace) -> dict:
    """What a run writes down about its signals: the variant, the overridden keys and every resolved value."""
    return {"variant": args.signal_variant, "overrides": args.signal_overrides, **signal_options(args).as_dict()}


def selection_kwargs(opts: variant.SignalOptions, seed: int | None = None, rollout_counter: int = 0) -> dict:
    """The keyword arguments of `opd.math.select.select_mask` that the options set (and the random draw's seeds)."""
    score = ScoreOptions(ent_variant=opts.ta_opd_ent, quantiles=opts.quantiles, eps=opts.norm_eps,
                         normalisation=opts.normalisation)
    seeds = {} if seed is None else {"seed": seed, "rollout_counter": rollout_counter}
    return {"budget": opts.budget, "options": score, "random_stream": opts.random_stream, **seeds}


@dataclass
class BatchSignals:
    """Padded [B, T] views: validity, raw signals, margin and the sampled-token reverse KL."""
    valid_BT: Tensor
    entropy_BT: Tensor
    disagreement_BT: Tensor
    compatibility_BT: Tensor
    margin_BT: Tensor
    reverse_kl_BT: Tensor
    options: variant.SignalOptions = field(default_factory=variant.SignalOptions)

    def for_selection(self) -> Signals:
        """The selector's view; with norm_positions "response", Norm() counts every response position even
        when a caller narrows `valid_BT` (release+ta_opd selects among pre-release positions only)."""
        norm_mask_BT = self.valid_BT if self.options.norm_positions == "response" else None
        return Signals(valid_BT=self.valid_BT, entropy_BT=self.entropy_BT, disagreement_BT=self.disagreement_BT,
                       compatibility_BT=self.compatibility_BT, norm_mask_BT=norm_mask_BT)


def batch_signals(rollout_t: dict[str, Tensor], score_t: dict[str, Tensor],
                  options: variant.SignalOptions = variant.PAPER, margin: str = "top2") -> BatchSignals:
    """Signals of one batch, as `options` define C, D, H and their precision (exact D needs s_on_t)."""
    offsets = rollout_t["offsets_B1"]

    def pad(name: str, src: dict[str, Tensor]) -> Tensor:
        return to_padded(src[name], offsets)[0]

    valid_BT = to_padded(rollout_t["tokens_N"], offsets)[1]
    s_ids, s_lp = pad("s_topk_ids_NK", rollout_t).long(), pad("s_topk_logprobs_NK", rollout_t)
    t_ids, t_lp = pad("t_topk_ids_NK", score_t).long(), pad("t_topk_logprobs_NK", score_t)
    t_on_s = pad("t_on_s_logprobs_NK", score_t)
    s_on_t = pad("s_on_t_logprobs_NK", score_t) if "s_on_t_logprobs_NK" in score_t else None
    if options.disagreement == "exact" and s_on_t is None:
        raise ValueError("exact D needs scores made with --student (s_on_t_logprobs_NK is missing); "
                         "use the official variant or --signal-disagreement topk")
    dtype = torch.float64 if options.precision == "float64" else torch.float32
    D = ta.local_disagreement(s_ids, s_lp, t_ids, t_lp, t_on_s, s_on_t, mode=options.disagreement, dtype=dtype)
    C = ta.compatibility(s_ids, t_on_s, t_ids, t_lp, mode=options.compatibility, dtype=dtype)
    rkl = ta.reverse_kl_sampled(pad("s_logprob_N", rollout_t), pad("t_logprob_N", score_t))
    zero = ~valid_BT
    return BatchSignals(
        valid_BT=valid_BT,
        entropy_BT=ta.student_entropy(s_lp, options.entropy_divisor, dtype).masked_fill(zero, 0.0),
        disagreement_BT=D.masked_fill(zero, 0.0),
        compatibility_BT=C.masked_fill(zero, 0.0),
        margin_BT=ta.teacher_margin(t_on_s, margin).masked_fill(zero, 0.0),
        reverse_kl_BT=rkl.masked_fill(zero, 0.0),
        options=options,
    )


def release_indices(rollouts: Rollouts, sig: BatchSignals, tokenizer, rule: ReleaseRule) -> list[int | None]:
    """Release token index per rollout (None = supervise the whole response), from the teacher margin."""
    out = []
    for b, (_, response) in enumerate(rollouts.sequences()):
        text, offsets = token_char_offsets(tokenizer, response)
        out.append(release_token_index(sig.margin_BT[b, : len(response)], text, offsets, **rule.kwargs()))
    return out
