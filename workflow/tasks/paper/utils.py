"""Answer checking of the paper study's own lm-eval tasks (amc23, olympiadbench).

A response scores 1 when the content of its last \\boxed{...} is mathematically equal to the reference,
as judged by math-verify (HuggingFace's checker, pinned in envs/eval.yaml): 3/4 equals 0.75, x^2+1 equals
1+x^2, "1, 2" equals "2, 1". Only the final response counts: text after the last </think>; a response
that opened <think> and never closed it (thinking cut off by max_gen_toks) has no final answer and
scores 0, whatever it boxed while thinking. lm-eval's vllm backend already drops the thinking when it
is given think_end_token; the hf backend does not, so the check is done here too.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX = re.compile(r"\\(?:boxed|fbox)")
_BARE = re.compile(r"\s+([^\s$]+)")  # "\boxed 5", the brace-less form some models write


def final_response(text: str) -> str | None:
    """The answer part of a response: after the last </think>; None if thinking never finished."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return None
    return text


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


def score(response: str, reference: str) -> int:
    final = final_response(response)
    boxed = last_boxed(final) if final is not None else None
    return int(boxed is not None and is_equiv(boxed, str(reference)))


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """lm-eval hook: exact_match of the first response against doc["reference"] (set by process_docs)."""
    return {"exact_match": score(results[0], doc["reference"])}


def format_number(value) -> str:
    """A numeric answer as text: 3.0 -> "3" (AI-MO stores AMC answers as floats), 2.5 -> "2.5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def process_docs_amc23(dataset):
    """AMC 12 2023 (A and B) from AI-MO/aimo-validation-amc, which also holds AMC 12 2022."""
    dataset = dataset.filter(lambda doc: "2023" in doc["url"])
    # A new column: writing text into the float column "answer" would be cast back to float.
    return dataset.map(lambda doc: {"reference": format_number(doc["answer"])})


def process_docs_olympiadbench(dataset):
    """OlympiadBench rows with one reference string ("a, b" when there are several answers)."""
    return dataset.map(lambda doc: {"reference": ", ".join(strip_dollars(a) for a in doc["final_answer"])})
