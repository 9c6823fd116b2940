"""Probe an OPD recipe on the miniature world: train one student over several seeds, print greedy accuracy.

Each seed runs the real trainer (`python -m opd.engines.train`, every flag after `--` passed through), then decodes
the six miniature benchmarks greedily with the trained student and checks answers with the world's own
checker (`opd.worlds.get("miniature").is_correct`): the same numbers lm-eval reports for these tasks, in seconds instead of a
minute. Prints one row per seed and the mean ± sd. docs/training.md ("Recipe") was measured this way.

    .venv/bin/python benchmarks/recipe_probe.py --student student_l --seeds 0 1 2 -- \\
        --method full --steps 40 --prompts-per-step 64 --samples 1 --loss topk_forward_kl --lr 1e-4

Needs the miniature world and models (`snakemake --until sft_model` or `make study` first). Runs are written
under --out-root with their own MLflow store, so the study's store is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from opd import worlds

WORLD = worlds.get("miniature")


def greedy_accuracy(model_dir: Path, data_dir: Path, max_new_tokens: int = 160) -> dict[str, float]:
    """Accuracy (%) per benchmark of greedy decoding, and the in-domain average."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.infra.io import read_jsonl
    from opd.engines.rollout import Rollouts, generate_hf

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    acc = {}
    for task in WORLD.benchmarks:
        recs = read_jsonl(data_dir / f"{task}.jsonl", required=("question", "answer"))
        prompts = [WORLD.encode_prompt(tok, r["question"], "plain", True) for r in recs]
        out = Rollouts([str(i) for i in range(len(recs))],
                       generate_hf(model, tok, prompts, 2, 0.0, 1.0, max_new_tokens, seed=0, batch_size=100))
        texts = [tok.decode(resp, skip_special_tokens=True) for _, resp in out.sequences()]
        acc[task] = 100.0 * sum(WORLD.is_correct(t, r["answer"]) for t, r in zip(texts, recs)) / len(recs)
    acc["in_domain"] = statistics.mean(acc[t] for t in WORLD.in_domain)
    return acc


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="student_l", help="student model name under --models")
    p.add_argument("--teacher", default="teacher", help="teacher model name under --models")
    p.add_argument("--models", type=Path, default=Path("results/models"), help="directory of the model dirs")
    p.add_argument("--data", type=Path, default=Path("results/data"), help="directory of the world's JSONL files")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one run each")
    p.add_argument("--out-root", type=Path, default=Path("results/probe"), help="runs go to OUT_ROOT/<name>/seed~N")
    p.add_argument("--name", default="probe", help="name of this recipe (a folder under --out-root)")
    args = p.parse_args(ours)

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(args.out_root / 'mlflow.db').resolve()}"}
    args.out_root.mkdir(parents=True, exist_ok=True)
    base = greedy_accuracy(args.models / args.student, args.data)
    print(f"{args.student} before: in-domain {base['in_domain']:.1f}, reverse {base['reverse']:.1f}")
    rows = []
    for seed in args.seeds:
        out = args.out_root / args.name / f"seed~{seed}"
        cmd = [sys.executable, "-m", "opd.engines.train", "--student", str(args.models / args.student),
               "--teacher", str(args.models / args.teacher), "--world", "miniature", "--prompts", str(args.data / "train_prompts.jsonl"),
               "--out-dir", str(out), "--seed", str(seed), "--study", "probe", "--name", f"{args.name}-{seed}",
               "--restart-if-flags-changed", *train_flags]
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"seed~{seed}.log", "w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        rows.append(greedy_accuracy(out / "model", args.data))
        print(json.dumps({"seed": seed, **{k: round(v, 1) for k, v in rows[-1].items()}}), flush=True)
    ind = [r["in_domain"] for r in rows]
    sd = statistics.stdev(ind) if len(ind) > 1 else 0.0
    print(f"{args.name}: in-domain {statistics.mean(ind):.1f} ± {sd:.1f} over {len(ind)} seed(s) "
          f"(before {base['in_domain']:.1f}); flags: {' '.join(train_flags)}")


if __name__ == "__main__":
    main()
