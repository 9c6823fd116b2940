"""Worlds: what a study's data is, behind one interface, so the generic pipeline never names one.

A world brings the prompt template, the answer checker, its benchmark and out-of-domain task lists,
the tasks whose data files it writes itself, and where its training prompts come from. Engines
(rollouts, training) and studies (diagnostics, reports) receive a `World` from `get(name)`, the name
being the config's `world.name` (or an entry point's `--world`); none of them imports a world's own
package. Each world lives in its own sub-package (`opd.worlds.miniature`, `opd.worlds.paper`) and is
imported here lazily, by name, so the registry is the only place that knows them all.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

from opd.worlds.prompts import PROMPT_FORMATS, encode_prompt, render_prompt

# name -> module that defines WORLD. Lazy: importing the registry loads no world (nor math-verify).
_REGISTRY = {"miniature": "opd.worlds.miniature", "paper": "opd.worlds.paper"}
NAMES = tuple(_REGISTRY)


class UnknownWorldError(ValueError):
    """A world name that the registry does not know; the message lists the known ones."""


@dataclass(frozen=True)
class World:
    """What a study's data brings to the pipeline (every field is read by engines, studies or rules)."""
    name: str
    plain_template: str  # the `plain` prompt format, with a {question} slot
    checker: Callable[[str, str], bool]  # (response text, reference answer) -> correct
    in_domain: tuple[str, ...]  # default in-domain benchmarks (lm-eval task names)
    out_of_domain: tuple[str, ...]  # default out-of-domain benchmarks
    local_tasks: tuple[str, ...]  # tasks whose JSONL the world writes to <results>/data/<task>.jsonl
    prompt_source: str  # where its training prompts come from (for logs and docs)
    answer_template: str  # a correct final answer written the way the checker reads it, {answer} slot
    closed_benchmarks: bool  # True: evaluation.benchmarks must be among local_tasks (no other data exists)
    config_check: Callable[[dict], list[str]] | None = None  # the world's own config checks (one line per problem)

    @property
    def benchmarks(self) -> tuple[str, ...]:
        return self.in_domain + self.out_of_domain

    def is_correct(self, response: str, answer: str) -> bool:
        return bool(self.checker(response, str(answer)))

    def render_prompt(self, tokenizer, question: str, prompt_format: str, enable_thinking: bool) -> str:
        return render_prompt(tokenizer, question, prompt_format, enable_thinking, self.plain_template)

    def encode_prompt(self, tokenizer, question: str, prompt_format: str, enable_thinking: bool) -> list[int]:
        return encode_prompt(tokenizer, question, prompt_format, enable_thinking, self.plain_template)


def get(name: str) -> World:
    """The world registered under `name`; an unknown name raises with the known ones listed."""
    if name not in _REGISTRY:
        raise UnknownWorldError(f"unknown world {name!r}; known worlds: {', '.join(NAMES)}")
    return importlib.import_module(_REGISTRY[name]).WORLD


def add_args(parser: argparse.ArgumentParser) -> None:
    """--world, --prompt-format and --enable-thinking: how an entry point renders prompts and checks answers."""
    parser.add_argument("--world", required=True, choices=NAMES,
                        help="the study's world (config world.name): its prompt template and answer checker")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain",
                        help="plain: the world's own template (miniature: 'Question: ...\\nAnswer:'); "
                             "chat: the tokenizer's chat template with one user turn (real chat models)")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=True,
                        help="chat format only: passed to the chat template (Qwen3: a <think> trace first); "
                             "--no-enable-thinking for direct answers")


def config_problems(config: dict) -> list[str]:
    """World-specific checks of a schema-valid config: the world exists, can provide the benchmarks and passes
    its own checks (`World.config_check`: e.g. the miniature world can build the models as asked)."""
    name = config.get("world", {}).get("name", "miniature")
    try:
        world = get(name)
    except UnknownWorldError as err:
        return [f"world.name: {err}"]
    problems = world.config_check(config) if world.config_check else []
    if not world.closed_benchmarks:
        return problems
    return problems + [f"evaluation.benchmarks[{i}]: {task!r} is not a task of world {name!r}; allowed values: "
                       f"{', '.join(map(repr, world.local_tasks))}"
                       for i, task in enumerate(config.get("evaluation", {}).get("benchmarks", []))
                       if task not in world.local_tasks]


def check_answers(world: World, records: list[dict], path, sample: int = 20) -> None:
    """Smoke check before any model loads: the checker accepts the first `sample` reference answers
    written as `world.answer_template`. A prompts file whose answers the checker cannot parse would
    otherwise train with a train_accuracy of 0 and no error."""
    for lineno, rec in enumerate(records[:sample], start=1):
        response = world.answer_template.format(answer=rec["answer"])
        if not world.is_correct(response, rec["answer"]):
            raise ValueError(f"{path}:{lineno}: world {world.name!r} cannot check answer {rec['answer']!r} "
                             f"(its checker rejects the reference written as {response!r}); "
                             f"is world.name right for these prompts?")
