"""The miniature world: chained arithmetic made locally (generator), its BPE tokenizer and tiny Qwen3 models (SFT).

Nothing outside this package imports it except the registry (`opd.worlds.get("miniature")`).
"""

from opd.worlds import World
from opd.worlds.miniature.checks import config_problems
from opd.worlds.miniature.generator import BENCHMARKS, IN_DOMAIN, OUT_OF_DOMAIN, PROMPT_TEMPLATE, is_correct

WORLD = World(
    name="miniature",
    plain_template=PROMPT_TEMPLATE,
    checker=is_correct,
    in_domain=IN_DOMAIN,
    out_of_domain=OUT_OF_DOMAIN,
    local_tasks=BENCHMARKS,
    prompt_source="generated: opd.worlds.miniature.generator writes <results>/data/train_prompts.jsonl",
    answer_template="The answer is {answer}.",
    closed_benchmarks=True,
    config_check=config_problems,
)
