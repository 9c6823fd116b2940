"""Evaluate one model on one task with lm-eval (`hf` backend here, `vllm` on GPU machines).

Runs offline: the task YAMLs under workflow/tasks read local JSONL files, and the model is a local
Hugging Face directory. Writes lm-eval's results JSON (config, versions, metrics) and the per-problem
samples next to it, and logs the score to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

METRIC = "exact_match,strict-match"


def run_lm_eval(model_dir: Path, task: str, include_path: Path, backend: str, batch_size: int,
                max_gen_toks: int, limit: int | None, device: str) -> dict:
    """lm-eval's result dict for one (model, task); samples stay in result['samples']."""
    # Offline by construction: nothing here may reach the hub, so fail fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(model_dir), "dtype": "float32"}
    if backend == "vllm":
        model_args.update({"gpu_memory_utilization": 0.8, "enforce_eager": True})
    result = lm_eval.simple_evaluate(
        model=backend,
        model_args=model_args,
        tasks=[task],
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=True,
        gen_kwargs={"max_gen_toks": max_gen_toks},
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
        bootstrap_iters=1000,
    )
    if result is None:
        raise RuntimeError(f"lm-eval returned no result for task {task!r}")
    return result


def score(result: dict, task: str) -> tuple[float, float, int]:
    """(accuracy, its standard error, number of problems) of `task` in an lm-eval result."""
    metrics = result["results"][task]
    stderr = metrics.get(METRIC.replace(",", "_stderr,"), float("nan"))
    n = result.get("n-samples", {}).get(task, {}).get("effective", len(result.get("samples", {}).get(task, [])))
    return float(metrics[METRIC]), float(stderr) if stderr != "N/A" else float("nan"), int(n)


def write_outputs(result: dict, task: str, out: Path, samples_out: Path) -> None:
    samples = result.pop("samples", {}).get(task, [])
    samples_out.parent.mkdir(parents=True, exist_ok=True)
    with samples_out.open("w") as fh:
        for s in samples:
            fh.write(json.dumps({"doc_id": s["doc_id"], "target": s["target"],
                                 "response": s["resps"][0][0], "filtered": s["filtered_resps"][0],
                                 "exact_match": s["exact_match"]}, default=str) + "\n")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on one lm-eval task.")
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--model-name", required=True, help="name of the model in the study")
    parser.add_argument("--task", required=True, help="lm-eval task name (a YAML under --include-path)")
    parser.add_argument("--include-path", type=Path, required=True, help="directory of task YAMLs")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--samples-out", type=Path, required=True, help="per-problem JSONL to write")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="lm-eval model backend")
    parser.add_argument("--batch-size", type=int, default=64, help="generation batch size")
    parser.add_argument("--max-gen-toks", type=int, default=160, help="longest response in tokens")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--device", default="cpu", help="torch device for the hf backend")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--study", default="miniature", help="MLflow experiment name")
    args = parser.parse_args(argv)

    import torch

    from opd import tracking

    torch.set_num_threads(args.threads)
    if not (args.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model in {args.model_dir} (config.json missing)")
    tags = {"model": args.model_name, "task": args.task}
    with tracking.run(args.study, f"lm_eval[{args.model_name},{args.task}]", params=vars(args), tags=tags) as run:
        start = time.time()
        result = run_lm_eval(args.model_dir, args.task, args.include_path, args.backend, args.batch_size,
                             args.max_gen_toks, args.limit, args.device)
        acc, stderr, n = score(result, args.task)
        write_outputs(result, args.task, args.out, args.samples_out)
        run.log_metrics({"accuracy": acc, "accuracy_stderr": stderr, "n": n, "seconds": time.time() - start})
        run.log_artifact(args.out)
    print(json.dumps({"model": args.model_name, "task": args.task, "accuracy": acc, "n": n}))


if __name__ == "__main__":
    main()
