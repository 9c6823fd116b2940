# Config validation at load, and the small functions that turn config into rule inputs and params.
import os
import re

from snakemake.exceptions import WorkflowError

from opd.config import ConfigError, validate_config
from opd.toy import BENCHMARKS as WORLD_BENCHMARKS

try:
    validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as err:
    raise WorkflowError(str(err)) from None

TASKS_DIR = Path(workflow.basedir) / "workflow" / "tasks"
STUDY = config["study"]
THREADS = config["threads"]
MODELS = list(config["models"])
TEACHER = next(n for n, m in config["models"].items() if m["role"] == "teacher")
STUDENTS = [n for n, m in config["models"].items() if m["role"] == "student"]
DIAGNOSE_FIGURES = ["margin_reverse_kl", "disagreement", "release_points"]
BENCHMARKS = config["evaluation"]["benchmarks"]
EVAL_MODELS = config["evaluation"]["models"] or MODELS


TRAIN = config["train"]
TRAIN_STUDENTS = TRAIN["students"] or STUDENTS
TRAIN_ID = "{student}/{method}/K~{k}/ratio~{ratio}/seed~{seed}"
TRAIN_DIR = "results/train/" + TRAIN_ID


wildcard_constraints:
    model="|".join(MODELS),
    task="|".join(BENCHMARKS),
    student="|".join(STUDENTS),
    method="|".join(re.escape(m) for m in TRAIN["methods"]),
    k=r"\d+",
    ratio=r"[0-9.]+",
    seed=r"\d+",


def model_dir(model):
    return f"results/models/{model}"


def sft_args(wildcards):
    """Command-line flags of opd.sft for one model, from its config block."""
    m = config["models"][wildcards.model]
    keys = ["hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "steps", "batch_size", "lr"]
    flags = " ".join(f"--{k.replace('_', '-')} {m[k]}" for k in keys)
    return flags + (f" --head-dim {m['head_dim']}" if m["head_dim"] else "")


def eval_args(wildcards):
    e = config["evaluation"]
    flags = f"--batch-size {e['batch_size']} --max-gen-toks {e['max_gen_toks']}"
    return flags + (f" --limit {e['limit']}" if e["limit"] else "")


def rollout_args(wildcards):
    d = config["diagnose"]
    keys = ["n_prompts", "samples", "top_k", "temperature", "top_p", "max_new_tokens", "backend"]
    return " ".join(f"--{k.replace('_', '-')} {d[k]}" for k in keys) + f" --seed {config['seed']}"


def fixed_context_args(wildcards):
    d, f = config["diagnose"], config["diagnose"]["fixed_context"]
    return (f"--selectors {' '.join(f['selectors'])} --ratio {f['ratio']} --steps {f['steps']}"
            f" --lr {f['lr']} --mode {d['signal_mode']} --seed {config['seed']}")


def diagnose_args(wildcards):
    d, r = config["diagnose"], config["release"]
    return (f"--bins {d['bins']} --mode {d['signal_mode']} --margin {r['margin']}"
            f" --release-lambda {r['lambda']} --min-segments {r['min_segments']}"
            f" --min-prefix-segments {r['min_prefix_segments']} --sigma2 {r['sigma2']}")


def train_args(wildcards):
    keys = ["steps", "prompts_per_step", "samples", "max_new_tokens", "temperature", "lr", "clip_eps",
            "loss", "aggregation", "signal_mode", "checkpoint_every"]
    r = config["release"]
    return " ".join(f"--{k.replace('_', '-')} {TRAIN[k]}" for k in keys) + (
        f" --release-lambda {r['lambda']} --min-segments {r['min_segments']}"
        f" --min-prefix-segments {r['min_prefix_segments']} --sigma2 {r['sigma2']} --margin {r['margin']}")


def train_runs():
    """One dict of wildcards per training run of the study."""
    return [dict(student=s, method=m, k=TRAIN["top_k"], ratio=TRAIN["ratio"], seed=seed)
            for s in TRAIN_STUDENTS for m in TRAIN["methods"] for seed in TRAIN["seeds"]]


def trained_evals():
    return [f"results/train/{r['student']}/{r['method']}/K~{r['k']}/ratio~{r['ratio']}/seed~{r['seed']}"
            f"/eval/{t}.json" for r in train_runs() for t in BENCHMARKS]


def all_outputs():
    return [
        "results/report/training.md",
        "results/diagnose/report.md",
        "results/report/models.md",
        "results/report/models.csv",
        "results/report/models.png",
    ]
