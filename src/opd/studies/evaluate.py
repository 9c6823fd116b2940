"""Evaluate one model on one task with lm-eval (`hf` backend here, `vllm` on GPU machines).

Runs offline: the task YAMLs under workflow/tasks read local JSONL files, and the model is a local
Hugging Face directory. Writes lm-eval's results JSON (config, versions, metrics) and the per-problem
samples next to it, and logs the score to MLflow. Before lm-eval starts, every local JSONL a task reads is
parsed once (`check_task_data`): a malformed line is one error naming file:line, not a `datasets` traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import yaml

from opd.infra import cli, modeldirs
from opd.infra.io import read_jsonl, write_jsonl, write_text
from opd.infra.lmeval_results import METRIC, THINKING_KEY, eval_seed_dir, thinking_counts
from opd.studies import benchmarks

# Flag -> the config key it stands for (opd.infra.cli); one line per flag.
FLAGS = {
    "backend": "evaluation.backend",
    "max_gen_toks": "evaluation.max_gen_toks",
    "limit": "evaluation.limit",
    "num_fewshot": "evaluation.num_fewshot",
    "batch_size": "evaluation.batch_size",
    "eval_seed": "evaluation.seeds[]",
}
# lm-eval's default seeds (simple_evaluate's random / numpy / torch, and its vLLM backend's sampling seed):
# evaluation seed s adds s to each, so seed 0 is an evaluation exactly as it was before evaluation seeds.
LM_EVAL_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234}
VLLM_SEED = 1234


def parse_kv(items: list[str], flag: str) -> dict:
    """`key=value` flags into a dict; values parsed as JSON where they can be (numbers, true/false)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class _TaskLoader(yaml.SafeLoader):
    """Task YAMLs carry lm-eval's `!function module.name` tags: read them as nothing (only data_files matter)."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_data_files(task_yaml: Path) -> list[Path]:
    """The local JSON/JSONL files of a task YAML (`dataset_kwargs.data_files`: a path, a list, or per split)."""
    spec = yaml.load(task_yaml.read_text(), Loader=_TaskLoader) or {}
    files = (spec.get("dataset_kwargs") or {}).get("data_files") or []
    values = files.values() if isinstance(files, dict) else [files]
    flat = [f for v in values for f in ([v] if isinstance(v, str) else v)]
    return [Path(f) for f in flat if f.endswith((".jsonl", ".json"))]


# lm-eval 0.4.13's built-in tasks that run model-written code (unsafe_code: true), by name prefix.
CODE_TASK_PREFIXES = ("humaneval", "mbpp", "ds1000", "instructhumaneval")


def runs_code(task: str, tasks_dir: Path) -> bool:
    """Whether `task` executes model-written code: our YAML says unsafe_code, or a built-in code task's name."""
    task_yaml = tasks_dir / f"{task}.yaml"
    if task_yaml.is_file():
        return bool((yaml.load(task_yaml.read_text(), Loader=_TaskLoader) or {}).get("unsafe_code"))
    return task.startswith(CODE_TASK_PREFIXES)


def code_execution_problems(config: dict, root: Path | None = None) -> list[str]:
    """Validation check: a benchmark that runs model-written code needs evaluation.allow_code_execution."""
    e = config["evaluation"]
    if e.get("allow_code_execution"):
        return []
    tasks_dir = Path(root) / e["tasks_dir"] if root is not None else benchmarks.tasks_dir(config)
    return [f"evaluation.benchmarks[{i}]: {task!r} executes model-written code; set "
            f"evaluation.allow_code_execution: true to allow it (docs/paper.md, 'HumanEval')"
            for i, task in enumerate(e["benchmarks"]) if runs_code(task, tasks_dir)]


def check_task_data(tasks: list[str], include_path: Path, data_root: Path = Path(".")) -> None:
    """Parse each of our tasks' JSONL files, relative to `data_root` as lm-eval reads them (a DataFileError
    names file:line); built-in tasks are skipped."""
    for task in tasks:
        task_yaml = include_path / f"{task}.yaml"
        if task_yaml.is_file():
            for path in task_data_files(task_yaml):
                read_jsonl(data_root / path)


def seed_args(eval_seed: int, backend: str) -> tuple[dict, dict]:
    """(simple_evaluate's seed arguments, extra model_args) of evaluation seed `eval_seed`.

    The few-shot draw keeps lm-eval's seed: evaluation seeds change the sampling, not the prompts.
    """
    seeds = {k: v + eval_seed for k, v in LM_EVAL_SEEDS.items()}
    return seeds, ({"seed": VLLM_SEED + eval_seed} if backend == "vllm" and eval_seed else {})


def code_execution(allowed: bool) -> None:
    """lm-eval's code-execution switch (HF_ALLOW_CODE_EVAL) from --allow-code-execution only, never inherited."""
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    else:
        os.environ.pop("HF_ALLOW_CODE_EVAL", None)


def run_lm_eval(model_dir: Path, tasks: list[str], include_path: Path, backend: str, batch_size: int | str,
                max_gen_toks: int, limit: int | None, device: str, model_args: dict | None = None,
                gen_kwargs: dict | None = None, apply_chat_template: bool = False, offline: bool = True,
                num_fewshot: int | None = None, data_root: Path = Path("."), eval_seed: int = 0,
                allow_code_execution: bool = False) -> dict:
    """lm-eval's result dict for a model on `tasks` (one process: start-up dominates on small models).

    Our task YAMLs name their data files relative to the results root (`data/<task>.jsonl`), so lm-eval
    runs with `data_root` as its working directory; every path given here is made absolute first.
    `eval_seed` seeds the sampling (seed_args); `allow_code_execution` lets code-executing tasks (HumanEval)
    run the model's code (lm-eval's confirm_run_unsafe_code and HF_ALLOW_CODE_EVAL, docs/paper.md).
    """
    model_dir, include_path = model_dir.resolve(), include_path.resolve()
    if offline:  # nothing here may reach the hub, so fail fast instead of hanging
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(model_dir), "dtype": "float32"}
    if backend == "vllm":
        args.update({"gpu_memory_utilization": 0.8, "enforce_eager": True})
    seeds, seed_model_args = seed_args(eval_seed, backend)
    args.update({**seed_model_args, **(model_args or {})})
    code_execution(allow_code_execution)
    # Our task YAMLs first; lm-eval's built-ins (MATH-500, AIME, GPQA, IFEval) stay visible beside them.
    manager = TaskManager(include_path=str(include_path), include_defaults=any(
        not (include_path / f"{t}.yaml").is_file() for t in tasks))
    with contextlib.chdir(data_root):
        result = lm_eval.simple_evaluate(
            model=backend,
            model_args=args,
            tasks=list(tasks),
            batch_size=batch_size,
            device=device,
            limit=limit,
            log_samples=True,
            gen_kwargs={**(gen_kwargs or {}), "max_gen_toks": max_gen_toks},
            apply_chat_template=apply_chat_template,
            num_fewshot=num_fewshot,
            task_manager=manager,
            bootstrap_iters=1000,
            confirm_run_unsafe_code=allow_code_execution,
            **seeds,
        )
    if result is None:
        raise RuntimeError(f"lm-eval returned no result for tasks {tasks}")
    return result


def score(result: dict, task: str, metric: str = METRIC) -> tuple[float, float, int]:
    """(`metric`, its standard error, number of problems) of `task` in an lm-eval result."""
    metrics = result["results"][task]
    if metric not in metrics:
        raise KeyError(f"task {task!r} reports no metric {metric!r}; it reports: "
                       f"{', '.join(k for k in metrics if not k.endswith('stderr') and ',' in k)}")
    name, _, filt = metric.partition(",")
    stderr = metrics.get(f"{name}_stderr,{filt}", float("nan"))
    n = result.get("n-samples", {}).get(task, {}).get("effective", len(result.get("samples", {}).get(task, [])))
    return float(metrics[metric]), float(stderr) if stderr != "N/A" else float("nan"), int(n)


def task_view(result: dict, task: str) -> dict:
    """The part of a multi-task lm-eval result that concerns `task` (same layout as a one-task run)."""
    view = {k: v for k, v in result.items() if k != "samples"}
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        if isinstance(result.get(key), dict):
            view[key] = {t: v for t, v in result[key].items() if t == task}
    return view


def sample_rows(result: dict, task: str, metric: str = METRIC) -> list[dict]:
    """One row per problem of `task`: doc_id, doc_hash, the response and `correct` (the metric's value).

    lm-eval logs a sample per (problem, filter); only the metric's filter is kept, so each problem appears
    once and the rows' mean is the reported score (opd.infra.lmeval_results.read_samples checks it).
    """
    name, _, filt = metric.partition(",")
    rows = []
    for s in result.get("samples", {}).get(task, []):
        if s.get("filter", filt) != filt:
            continue
        if name not in s:
            raise KeyError(f"task {task!r}: lm-eval's samples hold no metric {name!r} (they hold {s.get('metrics')})")
        rows.append({"doc_id": s["doc_id"], "doc_hash": s.get("doc_hash"), "filter": filt,
                     "target": str(s["target"]), "response": str(s["resps"][0][0]),
                     "filtered": str(s["filtered_resps"][0]), name: s[name], "correct": _as_score(s[name])})
    return rows


def _as_score(value) -> float:
    """A problem's metric value as a number; list-valued metrics (IFEval's instruction level) by their mean."""
    if isinstance(value, (list, tuple)):
        return sum(map(float, value)) / len(value) if value else float("nan")
    return float(value)


def write_outputs(result: dict, task: str, out_dir: Path, metric: str = METRIC, thinking_mode: bool = False) -> Path:
    """<out_dir>/<task>.json (lm-eval's result) and <task>.samples.jsonl (one row per problem); returns the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / f"{task}.samples.jsonl", sample_rows(result, task, metric))
    out = out_dir / f"{task}.json"
    thinking = thinking_counts([s["resps"][0][0] for s in result.get("samples", {}).get(task, [])], thinking_mode)
    write_text(out, json.dumps({**task_view(result, task), THINKING_KEY: thinking}, indent=2, default=str))
    return out


def training_run_id(train_dir: Path) -> str:
    """The MLflow run of an OPD training directory (from its latest complete checkpoint)."""
    states = sorted(train_dir.glob("checkpoints/step_*/state.json"))  # checkpoints.replaced-* are old runs
    if not states:
        raise FileNotFoundError(f"{train_dir}: no complete checkpoint with a state.json")
    return json.loads(states[-1].read_text())["run_id"]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Evaluate a model on lm-eval tasks.")
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--model-name", required=True, help="name of the model in the study")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (YAMLs under --include-path)")
    parser.add_argument("--include-path", type=Path, required=True,
                        help="directory of our task YAMLs (lm-eval's built-in tasks are found too)")
    parser.add_argument("--out-dir", type=Path, required=True, help="writes <task>.json and <task>.samples.jsonl")
    parser.add_argument("--train-dir", type=Path, default=None,
                        help="OPD training directory: also log the scores to its MLflow run")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="lm-eval model backend")
    parser.add_argument("--batch-size", default=64, type=lambda v: int(v) if v.lstrip("-").isdigit() else v,
                        help="generation batch size (an int, or auto)")
    parser.add_argument("--model-arg", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra lm-eval model_args, e.g. max_model_len=32768 enable_thinking=true")
    parser.add_argument("--gen-kwarg", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra lm-eval gen_kwargs, e.g. temperature=0.6 top_p=0.95")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument("--apply-chat-template", action="store_true", help="prompt through the chat template")
    parser.add_argument("--online", action="store_true",
                        help="allow hub downloads (built-in tasks' datasets); default: HF offline mode")
    parser.add_argument("--metric", nargs="*", default=[], metavar="TASK=METRIC",
                        help=f"lm-eval metric key per task where it is not {METRIC!r}")
    parser.add_argument("--max-gen-toks", type=int, default=160, help="longest response in tokens")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--device", default="cpu", help="torch device for the hf backend")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("OPD_RESULTS", "results")),
                        help="results root our task YAMLs' data files are relative to (default: $OPD_RESULTS, "
                             "which the workflow sets from config results_dir, else results)")
    parser.add_argument("--eval-seed", type=int, default=0,
                        help="evaluation seed: seeds the sampling; seed s > 0 writes under <out-dir>/evalseed~<s>/")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="let code-executing tasks (HumanEval) run the model's code (config "
                             "evaluation.allow_code_execution; sets HF_ALLOW_CODE_EVAL / confirm_run_unsafe_code)")
    parser.add_argument("--study", default="miniature", help="MLflow experiment name")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked against the config schema (opd.infra.cli.parse)."""
    return cli.parse(build_parser(), argv, FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = eval_seed_dir(args.out_dir, args.eval_seed)
    modeldirs.check_dir(args.model_dir, "--model-dir")
    check_task_data(args.tasks, args.include_path, args.data_root)

    import torch

    from opd.infra import tracking

    torch.set_num_threads(args.threads)
    name = f"lm_eval[{args.model_name},{args.tasks[0]}]" if len(args.tasks) == 1 else f"lm_eval[{args.model_name}]"
    name = name if args.eval_seed == 0 else f"{name[:-1]},evalseed~{args.eval_seed}]"
    task_metric = {t: m for t, m in (i.partition("=")[::2] for i in args.metric)}
    with tracking.run(args.study, name, params=vars(args),
                      tags={"model": args.model_name, "eval_seed": args.eval_seed}) as run:
        start = time.time()
        result = run_lm_eval(args.model_dir, args.tasks, args.include_path, args.backend, args.batch_size,
                             args.max_gen_toks, args.limit, args.device, parse_kv(args.model_arg, "--model-arg"),
                             parse_kv(args.gen_kwarg, "--gen-kwarg"), args.apply_chat_template, not args.online,
                             args.num_fewshot, args.data_root, args.eval_seed, args.allow_code_execution)
        metrics, thinking = {}, bool(parse_kv(args.model_arg, "--model-arg").get("enable_thinking"))
        for task in args.tasks:
            acc, stderr, n = score(result, task, task_metric.get(task, METRIC))
            prefix = "" if len(args.tasks) == 1 else f"{task}."
            metrics.update({f"{prefix}accuracy": acc, f"{prefix}accuracy_stderr": stderr, f"{prefix}n": n})
            run.log_artifact(write_outputs(result, task, out_dir, task_metric.get(task, METRIC), thinking))
        run.log_metrics({**metrics, "seconds": time.time() - start})
    if args.train_dir is not None:  # the scores of a trained student belong with its training run too
        suffix = "" if args.eval_seed == 0 else f".eval_seed_{args.eval_seed}"  # the mean: the reports' runs
        tracking.log_to_run(training_run_id(args.train_dir),
                            {f"eval.{t}.accuracy{suffix}": score(result, t, task_metric.get(t, METRIC))[0]
                             for t in args.tasks})
    print(json.dumps({"model": args.model_name, **metrics}))


if __name__ == "__main__":
    cli.run(main)
