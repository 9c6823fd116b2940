"""The paper world: DAPO-Math-17k training prompts, math-verify answer checking, Qwen3 chat prompts.

Benchmarks are lm-eval tasks (built-in ones fetch their own data; amc23 and olympiadbench are our YAMLs in
workflow/tasks/paper), so the world writes no benchmark files itself. Nothing outside this package
imports it except the registry (`opd.worlds.get("paper")`).
"""

from opd.worlds import World
from opd.worlds.paper.checker import is_correct

WORLD = World(
    name="paper",
    plain_template="{question}",  # the chat format is the paper study's; plain shows the bare user turn
    checker=is_correct,
    in_domain=("minerva_math500", "aime24", "aime25", "amc23", "olympiadbench"),
    out_of_domain=("gpqa_diamond_cot_zeroshot", "ifeval"),
    local_tasks=(),
    prompt_source="DAPO-Math-17k, deduplicated by opd.worlds.paper.dapo into <results>/data/train_prompts.jsonl",
    answer_template="The final answer is $\\boxed{{{answer}}}$.",
    closed_benchmarks=False,
)
