# Config validation at load, and the small functions that turn config into rule inputs and params.
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
BENCHMARKS = config["evaluation"]["benchmarks"]
EVAL_MODELS = config["evaluation"]["models"] or MODELS


wildcard_constraints:
    model="|".join(MODELS),
    task="|".join(BENCHMARKS),


def model_dir(model):
    return f"results/models/{model}"


def sft_args(wildcards):
    """Command-line flags of opd.sft for one model, from its config block."""
    m = config["models"][wildcards.model]
    keys = ["hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "steps", "batch_size", "lr"]
    return " ".join(f"--{k.replace('_', '-')} {m[k]}" for k in keys)


def eval_args(wildcards):
    e = config["evaluation"]
    flags = f"--batch-size {e['batch_size']} --max-gen-toks {e['max_gen_toks']}"
    return flags + (f" --limit {e['limit']}" if e["limit"] else "")


def all_outputs():
    return [
        "results/report/models.md",
        "results/report/models.csv",
        "results/report/models.png",
    ]
