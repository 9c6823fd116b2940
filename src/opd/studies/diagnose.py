"""The diagnostic study on the initial students: the figures and tables that motivate both methods.

Per student scale, from its rollouts and the teacher's scores:
- teacher margin and sampled-token reverse KL against RELATIVE position in the response (prefix
  teach / suffix fade: the margin should fall along the response);
- where the release rule fires (relative position of the release token; share of rollouts released);
- learnable vs incompatible disagreement along the response: D·C (teacher mass moved among the
  student's own candidates) vs D·(1 − C) (mass off the student's support);
- the fixed-context gain table by selector (rows from `opd.studies.fixed_context`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from torch import Tensor

from opd.infra import cli, modeldirs
from opd.infra.io import write_json, write_rows_csv, write_text
from opd.math.release import ReleaseRule
from opd.engines.rollout import Rollouts
from opd.engines.score import load_scores
from opd.engines.signals import (RELEASE_FLAGS, BatchSignals, add_release_args, add_signal_args, batch_signals,
                                release_indices, release_rule, resolve_signal_args, signal_flags, signal_options)

PROFILES = ("margin", "reverse_kl", "learnable", "incompatible")


def position_profile(values_BT: Tensor, valid_BT: Tensor, n_bins: int = 10) -> list[float]:
    """Mean of `values` per relative-position bin: token t of a length-L response is in bin ⌊n·t/L⌋."""
    lengths_B = valid_BT.sum(-1, keepdim=True).clamp(min=1)
    t_BT = torch.arange(values_BT.shape[-1])[None, :].expand_as(values_BT)
    bin_BT = torch.div(t_BT * n_bins, lengths_B, rounding_mode="floor").clamp(max=n_bins - 1)
    v, b = values_BT[valid_BT].double(), bin_BT[valid_BT]
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add(0, b, v)
    counts = torch.zeros(n_bins, dtype=torch.float64).index_add(0, b, torch.ones_like(v))
    return (sums / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).tolist()


def profiles(sig: BatchSignals, n_bins: int) -> dict[str, list[float]]:
    D, C = sig.disagreement_BT, sig.compatibility_BT
    series = {"margin": sig.margin_BT, "reverse_kl": sig.reverse_kl_BT, "learnable": D * C,
              "incompatible": D * (1 - C)}
    return {k: position_profile(v, sig.valid_BT, n_bins) for k, v in series.items()}


def release_points(rollouts: Rollouts, sig: BatchSignals, tokenizer, rule: ReleaseRule) -> list[float | None]:
    """Relative release position (release token / response length) per rollout, None = no release."""
    lengths = [len(r) for _, r in rollouts.sequences()]
    return [None if idx is None else idx / n
            for idx, n in zip(release_indices(rollouts, sig, tokenizer, rule), lengths)]


def summary_row(name: str, rollouts: Rollouts, sig: BatchSignals, released: list[float | None]) -> dict:
    v = sig.valid_BT
    D, C = sig.disagreement_BT[v], sig.compatibility_BT[v]
    rel = [r for r in released if r is not None]
    return {
        "student": name, "rollouts": len(rollouts.ids), "tokens": int(v.sum()),
        "accuracy": sum(rollouts.meta.get("correct", [])) / max(1, len(rollouts.ids)),
        "mean_margin": float(sig.margin_BT[v].mean()), "mean_reverse_kl": float(sig.reverse_kl_BT[v].mean()),
        "learnable_share": float((D * C).sum() / D.sum().clamp(min=1e-12)),
        "released_share": len(rel) / max(1, len(released)),
        "mean_release_position": sum(rel) / len(rel) if rel else float("nan"),
    }


def plot_all(prof: dict[str, dict[str, list[float]]], released: dict[str, list], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_bins = len(next(iter(prof.values()))["margin"])
    x = [(i + 0.5) / n_bins for i in range(n_bins)]
    paths = []
    panels = [("margin_reverse_kl.png", [("margin", "teacher margin m_t (nats)"), ("reverse_kl", "reverse KL (sampled)")]),
              ("disagreement.png", [("learnable", "learnable D·C"), ("incompatible", "incompatible D·(1−C)")])]
    for fname, pair in panels:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, (key, label) in zip(axes, pair):
            for student, p in prof.items():
                ax.plot(x, p[key], marker="o", label=student)
            ax.set_xlabel("relative position in response")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for student, rel in released.items():
        vals = [r for r in rel if r is not None]
        ax.hist(vals, bins=10, range=(0, 1), histtype="step", linewidth=2,
                label=f"{student} ({len(vals)}/{len(rel)} released)")
    ax.set_xlabel("release point (relative position)")
    ax.set_ylabel("rollouts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "release_points.png", dpi=110)
    plt.close(fig)
    return paths + [out_dir / "release_points.png"]


def markdown(rows: list[dict], floats: str = ".3f") -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:{floats}}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]) + "\n"


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def read_fixed_context(paths: list[Path], names: list[str]) -> list[dict]:
    rows = []
    for name, path in zip(names, paths):
        with open(path) as fh:
            rows += [{"student": name, **{k: _number(v) if k != "selector" else v for k, v in r.items()}}
                     for r in csv.DictReader(fh)]
    return rows


FLAGS = {  # flag -> the config key it stands for (opd.infra.cli); one line per flag
    "bins": "diagnose.bins",
    **signal_flags(),
    **RELEASE_FLAGS,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Diagnostic figures and tables of the initial students.")
    p.add_argument("--students", nargs="+", required=True, help="student names, in display order")
    p.add_argument("--rollouts", nargs="+", type=Path, required=True, help="rollouts file per student")
    p.add_argument("--scores", nargs="+", type=Path, required=True, help="scores file per student")
    p.add_argument("--fixed-context", nargs="+", type=Path, required=True, help="fixed-context CSV per student")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory (shared)")
    p.add_argument("--out-dir", type=Path, required=True, help="where figures and tables go")
    p.add_argument("--bins", type=int, default=10, help="relative-position bins")
    add_release_args(p)
    add_signal_args(p)
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    cli.document(p, FLAGS)
    args = p.parse_args(argv)
    if not len(args.students) == len(args.rollouts) == len(args.scores) == len(args.fixed_context):
        p.error("--students, --rollouts, --scores and --fixed-context need one entry per student")
    resolve_signal_args(cli.validate(args, FLAGS))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from opd.infra import tracking

    tokenizer = AutoTokenizer.from_pretrained(str(modeldirs.check_dir(args.tokenizer, "--tokenizer",
                                                                      modeldirs.TOKENIZER_FILES)))
    try:
        rule = release_rule(args)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    prof, released, summary = {}, {}, []
    for name, r_path, s_path in zip(args.students, args.rollouts, args.scores):
        rollouts = Rollouts.load(r_path)
        sig = batch_signals(rollouts.tensors, load_scores(s_path, rollouts, r_path), signal_options(args), args.margin)
        prof[name] = profiles(sig, args.bins)
        released[name] = release_points(rollouts, sig, tokenizer, rule)
        summary.append(summary_row(name, rollouts, sig, released[name]))
    fixed = read_fixed_context(args.fixed_context, args.students)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(out / "summary.csv", summary)
    write_rows_csv(out / "fixed_context.csv", fixed)
    write_rows_csv(out / "profiles.csv", [{"student": s, "signal": k, **{f"bin{i}": v for i, v in enumerate(vals)}}
                                     for s, p in prof.items() for k, vals in p.items()])
    write_json(out / "release_points.json", released, indent=None)
    figures = plot_all(prof, released, out)
    fc_cols = ("student", "selector", "n_selected", "gain", "gain_abs", "gain_rel", "gain_abs_selected")
    write_text(
        out / "report.md", "# Diagnostic study (initial students)\n\n## Per student\n\n" + markdown(summary)
        + "\n## Fixed-context gain by selector\n\n" + markdown([{c: r[c] for c in fc_cols} for r in fixed], ".4f")
        + "\n" + "".join(f"![{f.stem}]({f.name})\n" for f in figures))
    with tracking.run(args.study, "diagnose", params=vars(args)) as run:
        run.log_metrics({f"{r['student']}.{k}": v for r in summary for k, v in r.items()
                         if isinstance(v, (int, float)) and v == v})
        for path in [out / "report.md", out / "summary.csv", out / "fixed_context.csv", *figures]:
            run.log_artifact(path)
    print((out / "report.md").read_text())


if __name__ == "__main__":
    cli.run(main)
