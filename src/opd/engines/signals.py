"""From stored rollouts + teacher scores to the per-position signals of both papers ([B, T] tensors).

Glue between the compact flat storage (`opd.infra.store`) and the pure math (`opd.math.teachability`); the
diagnostic study and the OPD trainer both call `batch_signals`, so the two always see the same numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import Tensor

from opd.engines.rollout import Rollouts, token_char_offsets
from opd.infra.store import to_padded
from opd.math import teachability as ta
from opd.math.release import SIGMA2_ESTIMATES, ReleaseRule, release_token_index
from opd.math.select import Signals


# The release rule's flags -> their config keys (opd.infra.cli; --sigma2 also takes a number: release_rule checks it).
RELEASE_FLAGS = {
    "margin": "release.margin",
    "release_lambda": "release.lambda",
    "min_segments": "release.min_segments",
    "min_prefix_segments": "release.min_prefix_segments",
}


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


@dataclass
class BatchSignals:
    """Padded [B, T] views: validity, raw signals, margin and the sampled-token reverse KL."""
    valid_BT: Tensor
    entropy_BT: Tensor
    disagreement_BT: Tensor
    compatibility_BT: Tensor
    margin_BT: Tensor
    reverse_kl_BT: Tensor
    mode: str

    def for_selection(self) -> Signals:
        return Signals(valid_BT=self.valid_BT, entropy_BT=self.entropy_BT,
                       disagreement_BT=self.disagreement_BT, compatibility_BT=self.compatibility_BT)


def batch_signals(rollout_t: dict[str, Tensor], score_t: dict[str, Tensor], mode: str | None = None,
                  margin: str = "top2") -> BatchSignals:
    """Signals of one batch. mode: "exact" (needs s_on_t in the scores) or "topk" (official code)."""
    offsets = rollout_t["offsets_B1"]

    def pad(name: str, src: dict[str, Tensor]) -> Tensor:
        return to_padded(src[name], offsets)[0]

    valid_BT = to_padded(rollout_t["tokens_N"], offsets)[1]
    s_ids, s_lp = pad("s_topk_ids_NK", rollout_t).long(), pad("s_topk_logprobs_NK", rollout_t)
    t_ids, t_lp = pad("t_topk_ids_NK", score_t).long(), pad("t_topk_logprobs_NK", score_t)
    t_on_s = pad("t_on_s_logprobs_NK", score_t)
    s_on_t = pad("s_on_t_logprobs_NK", score_t) if "s_on_t_logprobs_NK" in score_t else None
    if mode is None:
        mode = "exact" if s_on_t is not None else "topk"
    if mode == "exact" and s_on_t is None:
        raise ValueError("exact signals need scores made with --student (s_on_t_logprobs_NK is missing)")
    D = ta.local_disagreement(s_ids, s_lp, t_ids, t_lp, t_on_s, s_on_t, mode=mode)
    C = ta.compatibility(s_ids, t_on_s, t_ids, t_lp, mode=mode)
    rkl = ta.reverse_kl_sampled(pad("s_logprob_N", rollout_t), pad("t_logprob_N", score_t))
    zero = ~valid_BT
    return BatchSignals(
        valid_BT=valid_BT,
        entropy_BT=ta.student_entropy(s_lp).masked_fill(zero, 0.0),
        disagreement_BT=D.masked_fill(zero, 0.0),
        compatibility_BT=C.masked_fill(zero, 0.0),
        margin_BT=ta.teacher_margin(t_on_s, margin).masked_fill(zero, 0.0),
        reverse_kl_BT=rkl.masked_fill(zero, 0.0),
        mode=mode,
    )


def release_indices(rollouts: Rollouts, sig: BatchSignals, tokenizer, rule: ReleaseRule) -> list[int | None]:
    """Release token index per rollout (None = supervise the whole response), from the teacher margin."""
    out = []
    for b, (_, response) in enumerate(rollouts.sequences()):
        text, offsets = token_char_offsets(tokenizer, response)
        out.append(release_token_index(sig.margin_BT[b, : len(response)], text, offsets, **rule.kwargs()))
    return out
