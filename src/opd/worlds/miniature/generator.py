"""The miniature world: a deterministic generator of multi-sentence reasoning problems.

In-domain skill: chained arithmetic on numbers 0..max_value (default 30). A problem with L operations has a solution of
L + 1 sentences ("7 plus 5 is 12. 12 times 2 is 24. The answer is 24."), so a per-step error rate e
gives an accuracy near (1 - e)^L: chain length is a natural difficulty ladder (`arith1` .. `arith5`).

Arithmetic solutions may end with a sentence or two of free-choice chatter after the answer (see
`make_chatter`): the low-contrast suffix that the release rule should find.

Out-of-domain skill: reversing a list of digits (`reverse`). The models learn it during SFT alongside
arithmetic, so a drop in `reverse` after distillation on arithmetic measures forgetting.

Every record is {"id", "task", "question", "solution", "answer"}; `answer` is a string and is what
`extract_answer` pulls out of a response. Everything is a pure function of (task, seed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

from opd.infra import cli
from opd.infra.io import write_jsonl

ANSWER_PATTERN = r"The answer is (-?[0-9]+)"  # the lm-eval task YAMLs use this same regex
ANSWER_RE = re.compile(ANSWER_PATTERN)
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

IN_DOMAIN = ("arith1", "arith2", "arith3", "arith4", "arith5")
OUT_OF_DOMAIN = ("reverse",)
BENCHMARKS = IN_DOMAIN + OUT_OF_DOMAIN
DEFAULT_MAX_VALUE = 30

# One operation: (question verb, solution verb, function, operand range).
_OPS = {
    "add": ("Add {d}.", "plus", lambda v, d: v + d, range(1, 10)),
    "sub": ("Subtract {d}.", "minus", lambda v, d: v - d, range(1, 10)),
    "mul": ("Multiply by {d}.", "times", lambda v, d: v * d, range(2, 4)),
}


def chain_length(task: str) -> int:
    """Number of operations of an `arithN` task."""
    if task not in IN_DOMAIN:
        raise ValueError(f"unknown arithmetic task {task!r}; known: {', '.join(IN_DOMAIN)}")
    return int(task[len("arith"):])


# Closing chatter after the answer: every slot is a free choice, so the teacher has no preference
# among the student's candidates there. This gives the world the suffix the release rule is about
# (late segments with little local contrast), as long reasoning traces have after their answer.
_CHATTER = (
    (("That", "This", "The"), ("problem", "question", "chain"), ("was", "seemed"), ("easy", "short", "fine")),
    (("I", "We"), ("checked", "verified", "reviewed"), ("each", "every"), ("step", "line")),
)
CHATTER_PROB = 0.8


def make_chatter(rng: random.Random) -> str:
    """Zero to two sentences of closing chatter with randomly filled slots ("" with prob 1 − CHATTER_PROB)."""
    if rng.random() >= CHATTER_PROB:
        return ""
    templates = rng.sample(_CHATTER, rng.randint(1, len(_CHATTER)))
    return "".join(" " + " ".join(rng.choice(slot) for slot in t) + "." for t in templates)


def make_arith(rng: random.Random, n_ops: int, max_value: int = DEFAULT_MAX_VALUE) -> dict:
    """One chained-arithmetic problem; every intermediate value stays in 0..max_value."""
    value = rng.randint(0, max_value)
    asks, steps = [f"Start with {value}."], []
    for _ in range(n_ops):
        # Keep only operations that stay in range, so every problem is solvable as written.
        choices = [
            (name, d)
            for name, (_, _, fn, operands) in _OPS.items()
            for d in operands
            if 0 <= fn(value, d) <= max_value
        ]
        name, d = rng.choice(choices)
        ask, verb, fn, _ = _OPS[name]
        new = fn(value, d)
        asks.append(ask.format(d=d))
        steps.append(f"{value} {verb} {d} is {new}.")
        value = new
    return {
        "question": " ".join(asks) + " What is the result?",
        "solution": " ".join(steps) + f" The answer is {value}." + make_chatter(rng),
        "answer": str(value),
    }


_STEP_RE = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")
_VERB_FN = {ask.split(" {d}")[0]: (verb, fn) for ask, verb, fn, _ in _OPS.values()}


def sloppy(record: dict, rng: random.Random, noise: float, max_value: int = DEFAULT_MAX_VALUE) -> dict:
    """An arithmetic record rewritten by a sloppy author: each step's result is off by one with probability
    `noise` (one more, or one less at max_value), and the chain goes on from the value written, so the worked
    solution stays self-consistent and its answer is the sloppy chain's. Other records come back unchanged."""
    if record["task"] not in IN_DOMAIN or noise <= 0:
        return record
    value = int(re.match(r"Start with (\d+)\.", record["question"]).group(1))
    steps = []
    for name, d in _STEP_RE.findall(record["question"]):
        verb, fn = _VERB_FN[name]
        new = fn(value, int(d))
        if rng.random() < noise:
            new = new + 1 if new < max_value else new - 1
        steps.append(f"{value} {verb} {d} is {new}.")
        value = new
    chatter = record["solution"].split(f"The answer is {record['answer']}.", 1)[1]
    return {**record, "solution": " ".join(steps) + f" The answer is {value}." + chatter, "answer": str(value)}


def make_reverse(rng: random.Random, min_len: int = 3, max_len: int = 6) -> dict:
    """One digit-reversal problem (the out-of-domain skill)."""
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(min_len, max_len))]
    rev = digits[::-1]
    return {
        "question": f"Reverse the digits {' '.join(digits)}.",
        "solution": f"Reversed, they read {' '.join(rev)}. The answer is {''.join(rev)}.",
        "answer": "".join(rev),
    }


def make_problem(task: str, rng: random.Random, max_value: int = DEFAULT_MAX_VALUE) -> dict:
    if task == "reverse":
        return make_reverse(rng)
    return make_arith(rng, chain_length(task), max_value)


def task_seed(seed: int, task: str, split: str) -> int:
    """A stable per-(task, split) seed: `hash()` is salted per process, so build it from bytes."""
    return int.from_bytes(f"{seed}/{split}/{task}".encode(), "little") % (2**63)


def generate(task: str, n: int, seed: int, split: str, exclude: frozenset[str] = frozenset(),
             distinct: bool = True, max_value: int = DEFAULT_MAX_VALUE) -> list[dict]:
    """`n` problems of `task` (pairwise distinct if `distinct`), none of whose questions is in `exclude`."""
    rng = random.Random(task_seed(seed, task, split))
    out: list[dict] = []
    seen = set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {task!r} problems for split {split!r}; lower the count")
        prob = make_problem(task, rng, max_value)
        if prob["question"] in seen:
            continue
        if distinct:
            seen.add(prob["question"])
        out.append({"id": f"{split}-{task}-{len(out):05d}", "task": task, **prob})
    return out


def extract_answer(response: str) -> str | None:
    """The first `The answer is N` in a response, or None."""
    match = ANSWER_RE.search(response)
    return match.group(1) if match else None


def is_correct(response: str, answer: str) -> bool:
    return extract_answer(response) == str(answer)


def mix(tasks_weights: dict[str, float], n: int, seed: int, split: str, exclude: frozenset[str],
        max_value: int = DEFAULT_MAX_VALUE) -> list[dict]:
    """`n` problems drawn across tasks in proportion to weights (for SFT and training prompts).

    Repeats are allowed: `arith1` has fewer than 2,000 distinct problems. Held-out questions never appear.
    """
    total = sum(tasks_weights.values())
    counts = {t: int(round(n * w / total)) for t, w in tasks_weights.items()}
    records = [r for t, c in counts.items() if c > 0 for r in generate(t, c, seed, split, exclude, False, max_value)]
    random.Random(task_seed(seed, "mix", split)).shuffle(records)
    return records


def build_world(out_dir: Path, n_bench: int, n_sft: int, n_prompts: int, seed: int,
                ood_fraction: float, max_value: int = DEFAULT_MAX_VALUE) -> dict[str, int]:
    """Write the six benchmarks, the SFT set and the OPD training prompts; return counts per file."""
    bench = {t: generate(t, n_bench, seed, "test", max_value=max_value) for t in BENCHMARKS}
    held_out = frozenset(r["question"] for recs in bench.values() for r in recs)
    weights = {t: (1.0 - ood_fraction) / len(IN_DOMAIN) for t in IN_DOMAIN}
    weights["reverse"] = ood_fraction
    sft = mix(weights, n_sft, seed, "sft", held_out, max_value)
    # OPD prompts are in-domain only (the papers distil on math) and disjoint from the benchmarks. They
    # may repeat SFT questions: short chains have too few distinct problems to keep three sets apart.
    prompts = mix({t: 1.0 for t in IN_DOMAIN}, n_prompts, seed, "prompts", held_out, max_value)
    files = {f"{t}.jsonl": recs for t, recs in bench.items()}
    files.update({"sft.jsonl": sft, "train_prompts.jsonl": prompts})
    for name, recs in files.items():
        write_jsonl(out_dir / name, recs)
    return {name: len(recs) for name, recs in files.items()}


def iter_problems(records: Iterable[dict]) -> Iterator[tuple[str, str]]:
    """(prompt, target) pairs in the format every stage uses."""
    for rec in records:
        yield PROMPT_TEMPLATE.format(question=rec["question"]), " " + rec["solution"]


FLAGS = {  # flag -> the config key it stands for (opd.infra.cli); one line per flag
    "n_bench": "world.n_bench",
    "n_sft": "world.n_sft",
    "n_prompts": "world.n_prompts",
    "ood_fraction": "world.ood_fraction",
    "max_value": "world.max_value",
    "seed": "seed",
}


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Write the miniature world's data sets.")
    parser.add_argument("--out-dir", type=Path, required=True, help="directory for the JSONL files")
    parser.add_argument("--n-bench", type=int, default=200, help="problems per benchmark")
    parser.add_argument("--n-sft", type=int, default=20000, help="supervised fine-tuning examples")
    parser.add_argument("--n-prompts", type=int, default=2000, help="OPD training prompts")
    parser.add_argument("--ood-fraction", type=float, default=0.2, help="share of `reverse` in the SFT mix")
    parser.add_argument("--max-value", type=int, default=DEFAULT_MAX_VALUE, help="largest number in a chain")
    parser.add_argument("--seed", type=int, default=0, help="world seed; same seed, same files")
    parser.add_argument("--study", default="miniature", help="MLflow experiment name")
    args = cli.parse(parser, argv, FLAGS)

    from opd.infra import tracking

    with tracking.run(args.study, "toy_data", params=vars(args)) as run:
        counts = build_world(args.out_dir, args.n_bench, args.n_sft, args.n_prompts, args.seed,
                             args.ood_fraction, args.max_value)
        run.log_metrics({f"n_{Path(k).stem}": v for k, v in counts.items()})
    print(json.dumps(counts))


if __name__ == "__main__":
    cli.run(main)
