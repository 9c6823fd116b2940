"""The lm-eval results files the study writes and reads: which metric, and a reader that names the file."""

from __future__ import annotations

import json
from pathlib import Path

METRIC = "exact_match,strict-match"  # lm-eval's 'name,filter' key of the miniature tasks' score


def read_score(path: Path, task: str, metric: str = METRIC) -> float:
    """`metric` of `task` in an lm-eval results file; errors name the file."""
    try:
        result = json.loads(Path(path).read_text())
        return float(result["results"][task][metric])
    except FileNotFoundError:
        raise FileNotFoundError(f"lm-eval results not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not an lm-eval result with {metric!r} for task {task!r} ({err!r})") from None


def parse_metrics(pairs: list[str]) -> dict[str, str]:
    """`TASK=METRIC` flags (lm-eval's 'name,filter' metric key) into {task: metric}."""
    out = {}
    for item in pairs:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise ValueError(f"--metric {item!r}: expected TASK=METRIC, e.g. ifeval=prompt_level_strict_acc,none")
        out[task] = metric
    return out
