"""The paper study's training prompts: DAPO-Math-17k, deduplicated, as `train_prompts.jsonl`.

Source. `BytedTsinghua-SIA/DAPO-Math-17k` on the Hugging Face hub, one `train` split of parquet rows:
    data_source   str                      ("math_dapo")
    prompt        list of {role, content}  one user message: DAPO's instruction wrapped around the problem
    ability       str                      ("MATH")
    reward_model  {ground_truth, style}    ground_truth: the answer as a string (an integer for DAPO)
    extra_info    {index}                  a per-problem id string
The hub copy holds each problem about 100 times (about 1.79M rows for about 17.9k source rows; the
maintainers call the copies an accident, see docs/paper.md), so the rows are deduplicated here.

Dedupe key: the problem text with DAPO's wrapper removed (`strip_wrapper`), Unicode NFKC-normalised,
every whitespace run collapsed to one space, ends stripped; case is kept (in maths `x` and `X` differ).
The first occurrence wins and the output keeps the source's order, so a run is a pure function of the file.
Rows whose keys agree but whose answers differ are *conflicts*: dropped (default), kept with the first
answer, or refused, and always listed in the stats JSON.

Prompt. The trainer renders {"role": "user", "content": question} with the Qwen3 chat template, so
`question` is the whole user turn. The default style `boxed` replaces DAPO's "Answer: $Answer" wrapper
with the Qwen3 model card's maths instruction, which is also the instruction of our evaluation tasks
(workflow/tasks/paper): the student is distilled on the answer format it is evaluated on. `dapo` keeps the
original user turn verbatim; `plain` gives the bare problem.

Network. Only `load_hub` touches the network (the hub), and only when no `--source` file is given.
`--dataset` names another hub copy with the same columns (default: the original above).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from opd.infra import cli
from opd.infra.io import DataFileError, write_json, write_jsonl

HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
TASK = "dapo_math"
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("boxed", "dapo", "plain")
CONFLICT_POLICIES = ("drop", "first", "error")
NORMALIZATION = "DAPO wrapper removed, Unicode NFKC, whitespace runs -> one space, ends stripped, case kept"
MAX_LISTED_CONFLICTS = 50

# DAPO's wrapper, matched loosely on whitespace so a re-exported copy with other line breaks still strips.
_PREFIX = re.compile(
    r"^\s*Solve the following math problem step by step\.\s+The last line of your response should be of "
    r"the form Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*")
_SUFFIX = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")
_SPACE = re.compile(r"\s+")


def strip_wrapper(text: str) -> str:
    """The problem inside DAPO's instruction wrapper (the text itself, stripped, when there is no wrapper)."""
    return _SUFFIX.sub("", _PREFIX.sub("", text)).strip()


def normalize(text: str) -> str:
    """The dedupe key of a prompt (see the module docstring)."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", strip_wrapper(text))).strip()


def make_question(raw: str, style: str) -> str:
    """The user turn the student sees, from the source's user message `raw`."""
    if style == "dapo":
        return raw
    problem = strip_wrapper(raw)
    if style == "plain":
        return problem
    if style == "boxed":
        return f"{problem}\n{BOXED_INSTRUCTION}"
    raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")


def field(row: dict, column: str, where: str) -> Any:
    """`row[a][b]...` for a dotted column `a.b`; a missing key raises an error naming file, row and column."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise DataFileError(f"{where}: no column {column!r} (found: {have})")
        value = value[part]
    return value


def user_text(value: Any, column: str, where: str) -> str:
    """The prompt text of a cell: a string, or the first user message of a chat list."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        text = users[0] if users else None
    else:
        text = None
    if not isinstance(text, str) or not text.strip():
        raise DataFileError(f"{where}: column {column!r} holds no user message text (got {value!r:.80})")
    return text


def answer_text(value: Any, column: str, where: str) -> str:
    if value is None or not str(value).strip():
        raise DataFileError(f"{where}: column {column!r} is empty")
    return str(value).strip()


def iter_file(path: Path) -> Iterator[dict]:
    """Rows of a local .parquet or .jsonl file, as dicts of Python values."""
    if not path.is_file():
        raise DataFileError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            yield from batch.to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open() as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    else:
        raise DataFileError(f"{path}: unsupported file type {path.suffix!r} (use .parquet or .jsonl)")


def load_hub(dataset: str, revision: str) -> tuple[Iterator[dict], str]:
    """Rows of hub dataset `dataset` at `revision`, and the commit it resolved to (the one network path)."""
    import datasets
    from huggingface_hub import HfApi

    # Resolve a branch or tag to its commit first and load that commit, so the stats record exactly
    # what was read even when `revision` is "main".
    sha = HfApi().dataset_info(dataset, revision=revision).sha
    ds = datasets.load_dataset(dataset, split="train", revision=sha)

    def rows() -> Iterator[dict]:
        for batch in ds.iter(batch_size=10_000):
            names = list(batch)
            for i in range(len(batch[names[0]])):
                yield {k: batch[k][i] for k in names}

    return rows(), sha


def dedupe(rows: Iterable[dict], source: str, prompt_column: str, answer_column: str) -> tuple[list[dict], int]:
    """Unique prompts in first-occurrence order, each with its answers' counts; and the number of rows read."""
    entries: dict[str, dict] = {}
    n = 0
    for n, row in enumerate(rows, start=1):
        where = f"{source}: row {n}"
        raw = user_text(field(row, prompt_column, where), prompt_column, where)
        answer = answer_text(field(row, answer_column, where), answer_column, where)
        entry = entries.setdefault(normalize(raw), {"raw": raw, "row": n - 1, "answers": Counter()})
        entry["answers"][answer] += 1
    if n == 0:
        raise DataFileError(f"{source}: no rows")
    return list(entries.values()), n


def build(entries: list[dict], rows_read: int, style: str, on_conflict: str) -> tuple[list[dict], dict]:
    """The prompt records and the stats of a dedupe (conflicts handled by `on_conflict`)."""
    records, conflicts = [], []
    for k, entry in enumerate(entries):
        answers = entry["answers"]
        if len(answers) > 1:
            conflicts.append({"id": f"dapo-{k:05d}", "source_row": entry["row"],
                              "problem_head": strip_wrapper(entry["raw"])[:120], "answers": dict(answers)})
            if on_conflict == "drop":
                continue
        # Ids number the unique prompts, so an id does not move when the conflict policy changes.
        records.append({"id": f"dapo-{k:05d}", "task": TASK, "question": make_question(entry["raw"], style),
                        "answer": next(iter(answers)), "problem": strip_wrapper(entry["raw"]),
                        "source_row": entry["row"]})
    if conflicts and on_conflict == "error":
        first = conflicts[0]
        raise DataFileError(f"{len(conflicts)} prompt(s) have conflicting answers, e.g. source row "
                            f"{first['source_row']}: {first['answers']} (use --on-conflict drop or first)")
    copies = [sum(e["answers"].values()) for e in entries]
    stats = {"rows_read": rows_read, "unique_prompts": len(entries), "duplicate_rows": rows_read - len(entries),
             "copies_per_prompt": {"min": min(copies), "max": max(copies)},
             "conflicting_prompts": len(conflicts), "conflict_policy": on_conflict,
             "dropped_conflicting_prompts": len(conflicts) if on_conflict == "drop" else 0,
             "written": len(records), "prompt_style": style, "normalization": NORMALIZATION,
             "conflicts": conflicts[:MAX_LISTED_CONFLICTS]}
    return records, stats


def prepare(source: Path | None, revision: str, out: Path, stats_path: Path, prompt_column: str,
            answer_column: str, style: str, on_conflict: str, dataset: str = HUB_ID) -> dict:
    """Read, dedupe and write; returns the stats (also written to `stats_path`)."""
    if source is None:
        rows, resolved = load_hub(dataset, revision)
        name = f"{dataset}@{resolved}"
    else:
        rows, resolved, name = iter_file(source), None, str(source)
    entries, n = dedupe(rows, name, prompt_column, answer_column)
    records, stats = build(entries, n, style, on_conflict)
    stats = {"source": name, "revision": resolved, "prompt_column": prompt_column,
             "answer_column": answer_column, **stats}
    write_jsonl(out, records)
    write_json(stats_path, stats, indent=2)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Deduplicate DAPO-Math-17k into OPD training prompts.")
    parser.add_argument("--source", type=Path, default=None,
                        help="local .parquet or .jsonl copy of the dataset (offline); default: the hub")
    parser.add_argument("--dataset", default=HUB_ID,
                        help="hub id of the dataset (a copy with the same columns); ignored with --source")
    parser.add_argument("--revision", default="main",
                        help="hub revision (branch, tag or commit; pin a commit for the study); "
                             "ignored with --source")
    parser.add_argument("--out", type=Path, required=True, help="the train_prompts.jsonl to write")
    parser.add_argument("--stats", type=Path, default=None,
                        help="stats JSON to write (default: <out without .jsonl>.stats.json)")
    parser.add_argument("--prompt-column", default="prompt",
                        help="column holding the prompt: a string or a chat list; dots reach into structs")
    parser.add_argument("--answer-column", default="reward_model.ground_truth",
                        help="column holding the reference answer; dots reach into structs")
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default="boxed",
                        help="boxed: problem + the \\boxed{} instruction; dapo: the original user turn; "
                             "plain: the problem alone")
    parser.add_argument("--on-conflict", choices=CONFLICT_POLICIES, default="drop",
                        help="a prompt seen with different answers: drop it, keep the first answer, or stop")
    parser.add_argument("--study", default="paper", help="MLflow experiment name")
    args = cli.parse(parser, argv, {"revision": "data.revision"})
    stats_path = args.stats or args.out.with_name(args.out.name.removesuffix(".jsonl") + ".stats.json")

    from opd.infra import tracking

    with tracking.run(args.study, "dapo_prompts", params=vars(args)) as run:
        stats = prepare(args.source, args.revision, args.out, stats_path, args.prompt_column,
                        args.answer_column, args.prompt_style, args.on_conflict, args.dataset)
        run.log_metrics({k: stats[k] for k in ("rows_read", "unique_prompts", "duplicate_rows",
                                                "conflicting_prompts", "written")})
        run.log_artifact(stats_path)
    if stats["conflicting_prompts"]:
        print(f"warning: {stats['conflicting_prompts']} prompt(s) with conflicting answers "
              f"({args.on_conflict}); listed in {stats_path}", file=sys.stderr)
    print(json.dumps({k: v for k, v in stats.items() if k != "conflicts"}))


if __name__ == "__main__":
    cli.run(main)
