import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """A script under benchmarks/ (not a package) imported as a module, for its tests."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_eval(d, outcomes: dict, metric="exact_match,strict-match", offset=0):
    """<d>/<task>.json and <task>.samples.jsonl with {task: [0/1 per problem]} (doc ids from `offset`)."""
    d.mkdir(parents=True, exist_ok=True)
    name = metric.partition(",")[0]
    for task, cs in outcomes.items():
        (d / f"{task}.json").write_text(json.dumps({"results": {task: {metric: sum(cs) / len(cs)}}}))
        (d / f"{task}.samples.jsonl").write_text("".join(
            json.dumps({"doc_id": offset + i, "doc_hash": f"h{offset + i}", "filter": metric.partition(",")[2],
                        name: c, "correct": float(c)}) + "\n" for i, c in enumerate(cs)))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A trained tokenizer and two random tiny Qwen3 models (teacher, student) sharing it.

    head_dim 32: the smallest head width vLLM's CPU attention supports (tests/test_vllm.py).
    """
    from opd.worlds.miniature import generator as toy
    from opd.worlds.miniature.sft import build_model
    from opd.infra.io import write_jsonl
    from opd.worlds.miniature.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_world")
    recs = [r for t in toy.BENCHMARKS for r in toy.generate(t, 30, seed=0, split="sft", distinct=False)]
    tok = train_tokenizer([p + t for p, t in toy.iter_problems(recs)], vocab_size=320)
    dirs = {}
    for name, (hidden, layers, seed) in {"teacher": (32, 2, 1), "student": (16, 1, 2)}.items():
        model = build_model(len(tok), hidden, layers, 2, 1, 2 * hidden, tok.eos_token_id, seed, head_dim=32)
        dirs[name] = root / name
        model.save_pretrained(str(dirs[name]))
        tok.save_pretrained(str(dirs[name]))
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, toy.generate("arith2", 6, seed=0, split="prompts"))
    return {"tokenizer": tok, "prompts": prompts, **dirs}
