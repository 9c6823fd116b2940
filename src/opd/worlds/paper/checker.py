"""The paper world's answer checker: math-verify on the final answer, for training metrics and lm-eval alike.

A response scores 1 when its final answer is mathematically equal to the reference, as judged by
math-verify (HuggingFace's checker, pinned in pyproject.toml and envs/eval.yaml): 3/4 equals 0.75,
x^2+1 equals 1+x^2, "1, 2" equals "2, 1". The final answer is the content of the last \\boxed{...} (the
Qwen3 maths instruction our prompts and evaluation tasks use) or, when nothing is boxed, the last
"Answer: ..." line (DAPO-Math's own instruction). Only the final response counts: text after the last
</think>; a response that opened <think> and never closed it (thinking cut off by the token limit) has
no final answer and scores 0, whatever it boxed while thinking.

The paper study's own lm-eval tasks (workflow/tasks/paper/utils.py: amc23, olympiadbench) call `score`,
so training's `train_accuracy` and the evaluation judge a response by the same rule; our variants of the
built-in tasks apply the same unfinished-thinking rule through `final_response` (docs/paper.md).
"""

from __future__ import annotations

import re

from opd.infra.lmeval_results import THINK_CLOSE, unfinished_thinking
_BOX = re.compile(r"\\(?:boxed|fbox)")
_BARE = re.compile(r"\s+([^\s$]+)")  # "\boxed 5", the brace-less form some models write


def final_response(text: str) -> str | None:
    """The answer part of a response: after the last </think>; None if thinking never finished."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    return None if unfinished_thinking(text) else text


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces kept; None if absent or unclosed."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                content = text[i + 1:j].strip()
                return content or None
        return None  # unbalanced: the response was cut inside the box
    bare = _BARE.match(text, i)
    return bare.group(1) if bare else None


def strip_dollars(answer: str) -> str:
    """A reference answer without surrounding $...$ (OlympiadBench writes its answers in math mode)."""
    answer = answer.strip()
    while len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer[1:-1].strip()
    return answer


def is_equiv(prediction: str, reference: str) -> bool:
    """math-verify's judgement of prediction == reference (both given as the inside of a box)."""
    if " ".join(prediction.split()) == " ".join(reference.split()):
        return True
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as err:  # pragma: no cover - the eval env pins it
        raise ImportError("the paper tasks need math-verify[antlr4_11_0]==0.9.0 (see envs/eval.yaml)") from err
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # Wrapping both sides in \boxed{} makes math-verify parse exactly that span, the same way for each.
    gold = parse(f"\\boxed{{{strip_dollars(reference)}}}", extraction_config=config)
    pred = parse(f"\\boxed{{{prediction}}}", extraction_config=config)
    try:
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # noqa: BLE001 - a checker crash on odd LaTeX is a wrong answer, not a failed run
        return False


_ANSWER_LINE = re.compile(r"^\s*\**Answer\**\s*:\s*(.+?)\s*$", re.MULTILINE)


def last_answer_line(text: str) -> str | None:
    """The content of the last "Answer: ..." line (DAPO's format), $...$ removed; None if there is none."""
    lines = _ANSWER_LINE.findall(text)
    if not lines:
        return None
    return strip_dollars(lines[-1]).rstrip(".").strip() or None


def final_answer(response: str) -> str | None:
    """The answer a response commits to: its last box, else its last Answer: line, after the thinking."""
    final = final_response(response)
    if final is None:
        return None
    boxed = last_boxed(final)
    return boxed if boxed is not None else last_answer_line(final)


def score(response: str, reference: str) -> int:
    answer = final_answer(response)
    return int(answer is not None and is_equiv(answer, str(reference)))


def is_correct(response: str, reference: str) -> bool:
    return bool(score(response, reference))


