"""The lm-eval results files the study writes and reads: which metric, and a reader that names the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

METRIC = "exact_match,strict-match"  # lm-eval's 'name,filter' key of the miniature tasks' score
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # Qwen3's thinking tags (lm-eval's think_end_token)
THINKING_KEY = "opd_thinking"  # our addition to a task's results file: how many responses never closed thinking


def eval_seed_dir(eval_dir: Path | str, seed: int) -> Path | str:
    """Where evaluation seed `seed` of an evaluation directory writes: the directory itself for seed 0 (the
    files of a study without evaluation seeds), <eval_dir>/evalseed~<seed> for any other seed. A string stays
    a string, unnormalised (the workflow's paths, wildcards and all, must match its rules' outputs exactly)."""
    out = eval_dir if int(seed) == 0 else os.path.join(eval_dir, f"evalseed~{int(seed)}")
    return Path(out) if isinstance(eval_dir, Path) else out


def unfinished_thinking(text: str) -> bool:
    """The response opened <think> and never closed it (cut by the token limit): it has no final answer."""
    return THINK_OPEN in text and THINK_CLOSE not in text


def thinking_counts(responses: list[str], thinking_mode: bool) -> dict:
    """{thinking_mode, responses, opened (a <think> tag seen), unfinished} over one task's responses.

    lm-eval (vllm, think_end_token) hands over only the text after </think>, so a finished trace shows no tag
    and `opened` undercounts; an unfinished one is kept whole, so `unfinished` is exact.
    """
    return {"thinking_mode": thinking_mode, "responses": len(responses),
            "opened": sum(THINK_OPEN in r for r in responses), "unfinished": sum(map(unfinished_thinking, responses))}


def read_unfinished_rate(path: Path) -> float | None:
    """Share of a task's responses whose thinking never closed; None for a run without thinking."""
    counts = json.loads(Path(path).read_text()).get(THINKING_KEY)
    if not counts or not (counts["thinking_mode"] or counts["opened"]):
        return None
    return counts["unfinished"] / max(1, counts["responses"])


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


def read_samples(path: Path, task: str, metric: str = METRIC) -> dict[str, float]:
    """{problem: correct} of a <task>.samples.jsonl (opd.studies.evaluate); checked against <task>.json.

    The problem key is doc_id plus lm-eval's doc_hash where the file has it, so two evaluations pair up only
    when they saw the same documents under the same ids. Older files (one row per filter, no `correct`
    column) are read through the metric's own column and filter.
    """
    path = Path(path)
    name, _, filt = metric.partition(",")
    out: dict[str, float] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"per-problem results not found: {path} (written by opd.studies.evaluate)") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("filter", filt) != filt:
            continue
        if "correct" not in rec and name not in rec:
            raise ValueError(f"{path}:{lineno}: no 'correct' and no {name!r} value")
        key = f"{rec['doc_id']}" + (f":{rec['doc_hash']}" if rec.get("doc_hash") else "")
        if key in out:
            raise ValueError(f"{path}:{lineno}: problem {rec['doc_id']} appears twice (one row per filter? "
                             f"re-run opd.studies.evaluate to rewrite it)")
        out[key] = float(rec.get("correct", rec.get(name)))
    reported = read_score(path.with_name(f"{task}.json"), task, metric)
    if not out or abs(sum(out.values()) / len(out) - reported) > 1e-6:
        raise ValueError(f"{path}: {len(out)} problems with mean {sum(out.values()) / max(1, len(out)):.4f}, "
                         f"but {task}.json reports {reported:.4f} for {metric!r}")
    return out
