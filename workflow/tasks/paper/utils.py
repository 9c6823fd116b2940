"""lm-eval hooks of the paper study's own tasks (amc23, olympiadbench).

Answers are judged by the paper world's checker (`opd.worlds.paper.checker`: math-verify on the last
\\boxed{} or "Answer:" line of the final response, 0 when the thinking never closed), the same function
that scores training rollouts. lm-eval's vllm backend already drops the thinking when it is given
think_end_token; the hf backend does not, so the checker does it too. These tasks import `opd`: run them
through `python -m opd.studies.evaluate` or with the package installed.
"""

from __future__ import annotations

from opd.worlds.paper.checker import score, strip_dollars


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
