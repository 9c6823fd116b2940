"""lm-eval hooks of the paper study's tasks: our own (amc23, olympiadbench) and our variants of the built-ins.

Answers of our own tasks are judged by the paper world's checker (`opd.worlds.paper.checker`: math-verify on
the last \\boxed{} or "Answer:" line of the final response), the same function that scores training rollouts.

One rule for unfinished thinking on every task of the paper table (docs/paper.md, "Unfinished thinking"): a
response that opened <think> and never closed it within max_gen_toks has no final answer and scores 0 on every
metric. lm-eval keeps the text after </think> (vllm backend with think_end_token) but hands an unclosed trace
over whole, so the built-ins would score an answer written mid-reasoning; our variants of aime24, aime25,
minerva_math500, gpqa_diamond_cot_zeroshot, ifeval and humaneval_instruct (same names: a task under --include-path replaces the
built-in) wrap the built-in scorers of lm-eval 0.4.13 with this rule and change nothing else. The hf backend
does not drop the thinking, so the wrappers do (text after the last </think>). These tasks import `opd` and
lm-eval's own task modules: run them through `python -m opd.studies.evaluate` or with the package installed.
"""

from __future__ import annotations

import importlib

from opd.worlds.paper.checker import final_response, score, strip_dollars


def _builtin(task_module: str, name: str):
    """A function of an lm-eval built-in task module (imported on use: ifeval needs langdetect, say)."""
    return getattr(importlib.import_module(f"lm_eval.tasks.{task_module}"), name)


def _zero(value):
    """The failing value of one metric: False / 0, or a list of them (ifeval's per-instruction lists)."""
    if isinstance(value, list):
        return [_zero(v) for v in value]
    return False if isinstance(value, bool) else 0


def unfinished_scores_zero(builtin, doc: dict, results: list[str]) -> dict:
    """`builtin` (an lm-eval process_results) on the final response; every metric 0 if thinking never closed."""
    final = final_response(results[0])
    if final is None:  # the built-in still runs, for the metric names and ifeval's list lengths
        return {k: _zero(v) for k, v in builtin(doc, [results[0]]).items()}
    return builtin(doc, [_as_lm_eval_strips(final, results[0])])


def _as_lm_eval_strips(final: str, response: str) -> str:
    """lm-eval's vllm backend lstrips the text after </think>; a response without tags stays as it is."""
    return final if final is response else final.lstrip()


def process_results_aime(doc: dict, results: list[str]) -> dict:
    return unfinished_scores_zero(_builtin("aime.utils", "process_results"), doc, results)


def process_results_minerva(doc: dict, results: list[str]) -> dict:
    return unfinished_scores_zero(_builtin("minerva_math.utils", "process_results"), doc, results)


def process_results_ifeval(doc: dict, results: list[str]) -> dict:
    return unfinished_scores_zero(_builtin("ifeval.utils", "process_results"), doc, results)


def process_results_humaneval(doc: dict, results: list[str]) -> dict:
    """pass@1 of humaneval_instruct (opd.worlds.paper.code_eval runs the program); 0 if thinking never closed."""
    from opd.worlds.paper import code_eval

    final = final_response(results[0])
    if final is None:
        return {"pass_at_1": 0}
    source = code_eval.program(doc["prompt"], _as_lm_eval_strips(final, results[0]), doc["test"], doc["entry_point"])
    return {"pass_at_1": int(code_eval.passes(source))}


def final_responses(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval `custom` filter (gpqa, scored by filters): each response's final part, "" if thinking never closed."""
    return [[_as_lm_eval_strips(f, r) if (f := final_response(r)) is not None else "" for r in rs] for rs in resps]


def minerva_process_docs(dataset):
    return _builtin("minerva_math.utils", "process_docs")(dataset)


def minerva_doc_to_text(doc: dict) -> str:
    return _builtin("minerva_math.utils", "doc_to_text")(doc)


def minerva_fewshot_samples() -> list[dict]:
    return _builtin("minerva_math.utils", "list_fewshot_samples")()


def gpqa_process_docs(dataset):
    return _builtin("gpqa.cot_zeroshot.utils", "process_docs")(dataset)


def agg_inst_level_acc(items) -> float:
    return _builtin("ifeval.utils", "agg_inst_level_acc")(items)


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
