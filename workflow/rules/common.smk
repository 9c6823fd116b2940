# Config validation at load, and the small functions that turn config into rule inputs and params.
import json
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from opd import worlds
from opd.engines import optim
from opd.infra import cli
from opd.infra.config import ConfigError
from opd.infra.lmeval_results import eval_seed_dir
from opd.studies import plan, sweep, validate

try:  # every check of `python -m opd.studies.validate` (opd.studies.validate.CHECKS), before any job
    validate.validate(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

WORLD = worlds.get(config["world"]["name"])
RESULTS = config["results_dir"].rstrip("/")
TASKS_DIR = Path(workflow.basedir) / config["evaluation"]["tasks_dir"]
STUDY = config["study"]
SRC_DIR = Path(workflow.basedir) / "src"


# Every job's shell starts with these exports (no os.environ is touched while the Snakefile is parsed).
# Jobs read the study name (their MLflow experiment) from the environment, not from params: models, runs
# and evaluations are shared between studies on the same results root, and a params change would rebuild
# them. Jobs in the conda envs of envs/ (--sdm conda) import opd from the source tree, not from an install.
# Absolute paths go here, never into params: a params change reruns a job, so a copied or moved project
# would rerun every lm-eval job (OPD_TASKS_DIR: our task YAMLs, read by eval_args' --include-path).
# Rules run in the environment that runs Snakemake: `python` and `torchrun` in every rule's shell are the
# interpreter that imported this workflow (shell functions: opd.infra.cli.interpreter_functions), whatever
# is first on PATH, so `.venv/bin/snakemake ...` works without an activated venv. Under --sdm conda, each
# rule's own conda env (activated before its shell runs) provides them. Functions, not an interpreter path
# in each rule: the rules' text (Snakemake's code trigger) and params stay as they were, so nothing reruns.
IN_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
INTERPRETER = cli.interpreter_functions(sys.executable, IN_CONDA).replace("{", "{{").replace("}", "}}")
shell.prefix(
    f"export OPD_STUDY={shlex.quote(STUDY)} OPD_RESULTS={shlex.quote(RESULTS)} OPD_TASKS_DIR={shlex.quote(str(TASKS_DIR))}"
    f" PYTHONPATH={shlex.quote(str(SRC_DIR))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; {INTERPRETER}"
)


def res(path):
    """A path under the results root (config results_dir); wildcards in `path` stay wildcards."""
    return f"{RESULTS}/{path}"


THREADS = config["threads"]
# A per-seed study's extra student builds (<student>~build<s>, train.student_builds): models made like their student.
BUILDS = sweep.builds(config["models"], config["train"])
MODELS = list(config["models"]) + list(BUILDS)
STUDENTS = [n for n, m in config["models"].items() if m["role"] == "student"]
DIAGNOSE_FIGURES = ["margin_reverse_kl", "disagreement", "release_points"]
BENCHMARKS = config["evaluation"]["benchmarks"]
EVAL_MODELS = config["evaluation"]["models"] or MODELS  # by default every model is evaluated, builds too
EVAL_SEEDS = config["evaluation"]["seeds"]  # seed 0 writes where a study without seeds does (eval_seed_dir)
# evaluation.jobs: a base model's lm_eval job covers one benchmark (the {task} wildcard) or, per_model, all of them.
PER_MODEL_EVAL = config["evaluation"]["jobs"] == "per_model"


DATA = config["data"]
PROMPTS = res("data/train_prompts.jsonl")
MINIATURE_MODELS = [n for n, m in config["models"].items() if not m.get("hub")] + list(BUILDS)
HUB_MODELS = [n for n, m in config["models"].items() if m.get("hub")]
TRAIN = config["train"]
PAIRS = sweep.pairs(config["models"], TRAIN)
TRAIN_STUDENTS = list(dict.fromkeys(s for _, s in PAIRS))
PER_SEED = sweep.per_seed_builds(TRAIN)
# The base evaluations the training reports read: each student, and each of its builds in a per-seed study
# (sweep.builds makes builds of the trained students only).
BASE_MODELS = TRAIN_STUDENTS + list(BUILDS)
TRAIN_ID = "{teacher}/{student}/{method}/K~{k}/ratio~{ratio}/seed~{seed}"
TRAIN_DIR = f"{RESULTS}/train/{TRAIN_ID}"
# evaluation.trained: with_training = train_opd evaluates its student in the same process (opd.studies.chain).
EVAL_WITH_TRAINING = config["evaluation"]["trained"] == "with_training"
REPORT_DIR = f"{RESULTS}/report/{STUDY}"
RES = config["resources"]
# Conda env per job for --sdm conda (absolute: the .smk files live at several depths); vLLM only where needed.
ENV_CORE, ENV_VLLM, ENV_EVAL = (str(Path(workflow.basedir) / f"envs/{n}.yaml") for n in ("core", "vllm", "eval"))
ENV_ROLLOUT = ENV_VLLM if config["diagnose"]["backend"] == "vllm" else ENV_CORE
ENV_TRAIN = ENV_VLLM if TRAIN["rollout_backend"] == "vllm" else ENV_CORE


def model_dir(model):
    return f"{RESULTS}/models/{model}"


def model_config(model):
    """A model's config block; a student build's is its student's."""
    return config["models"][BUILDS[model][0] if model in BUILDS else model]


def sft_seed(model):
    """The SFT seed of a miniature model: config `seed`, plus s for the build of training seed s."""
    return config["seed"] + (BUILDS[model][1] if model in BUILDS else 0)


def sft_priority(wildcards):
    """Teachers' SFT first: every distillation and diagnostic job waits for a teacher, so its SFT is the critical
    path (the miniature teacher: ~10 of ~20 minutes on 2 cores); started after the students, it cost 3 minutes."""
    return 1 if model_config(wildcards.model).get("role") == "teacher" else 0


def model_file(model):
    """The file that marks a model as ready: its SFT weights, or the manifest of a hub download."""
    return f"{model_dir(model)}/" + ("FETCHED.json" if model_config(model).get("hub") else "model.safetensors")


def pair_label(teacher, student):
    return sweep.pair_label(teacher, student, PAIRS)


def dapo_args(wildcards):
    """opd.worlds.paper.dapo's source flags: a local copy when data.path is set, else the pinned hub revision."""
    if DATA["path"]:
        return f"--source {shlex.quote(DATA['path'])}"
    return f"--revision {DATA['revision']}"


def prompt_args():
    """The world, and how rollouts and training render a prompt: its plain template or the chat template."""
    thinking = "--enable-thinking" if DATA["enable_thinking"] else "--no-enable-thinking"
    return f"--world {WORLD.name} --prompt-format {DATA['prompt_format']} {thinking}"


def release_args():
    """The release rule's flags (opd.engines.signals.add_release_args), shared by diagnose and training."""
    r = config["release"]
    return (
        f"--margin {r['margin']} --release-lambda {r['lambda']} --min-segments {r['min_segments']}"
        f" --min-prefix-segments {r['min_prefix_segments']} --sigma2 {r['sigma2']}"
    )


def signal_args(aggregation_flag="--signal-aggregation"):
    """--signal-variant and an override flag per signals.* key that is set (opd.engines.signals.add_signal_args)."""
    sig = config["signals"]
    flags = [f"--signal-variant {sig['variant']}"]
    for key, value in sig.items():
        if key == "variant" or value is None:
            continue
        flag = aggregation_flag if key == "aggregation" else f"--signal-{key.replace('_', '-')}"
        flags.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(flags)


def sft_args(wildcards):
    """Command-line flags of opd.worlds.miniature.sft for one model, from its config block."""
    m = model_config(wildcards.model)
    keys = ["hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "steps", "batch_size", "lr"]
    flags = " ".join(f"--{k.replace('_', '-')} {m[k]}" for k in keys)
    flags += f" --max-chain {m['max_chain']}" if m["max_chain"] else ""
    flags += f" --step-noise {m['step_noise']} --max-value {config['world']['max_value']}" if m["step_noise"] else ""
    return flags + (f" --head-dim {m['head_dim']}" if m["head_dim"] else "")


def _kv(items):
    """KEY=VALUE flags, each shell-quoted; booleans as JSON (true/false) so that they parse back as booleans."""
    return " ".join(shlex.quote(f"{k}={json.dumps(v) if isinstance(v, bool) else v}") for k, v in items.items())


def eval_args(wildcards):
    """opd.studies.evaluate's flags from the evaluation block (shared by the base and the trained models)."""
    e = config["evaluation"]
    flags = f"--backend {e['backend']} --batch-size {e['batch_size']} --max-gen-toks {e['max_gen_toks']}"
    flags += ' --include-path "$OPD_TASKS_DIR"' + (f" --limit {e['limit']}" if e["limit"] else "")
    flags += f" --num-fewshot {e['num_fewshot']}" if e["num_fewshot"] is not None else ""
    flags += " --apply-chat-template" * e["apply_chat_template"] + " --online" * (not e["offline"])
    if e["model_args"]:
        flags += f" --model-arg {_kv(e['model_args'])}"
    if e["gen_kwargs"]:
        flags += f" --gen-kwarg {_kv(e['gen_kwargs'])}"
    if e["metrics"]:
        flags += " --metric " + " ".join(shlex.quote(f"{t}={m}") for t, m in e["metrics"].items())
    flags += " --allow-code-execution" * e["allow_code_execution"]
    return flags


def seeded_eval_args(wildcards):
    """eval_args of evaluation seed {eseed} (> 0; seed 0 is the plain lm_eval / eval_trained job)."""
    return f"{eval_args(wildcards)} --eval-seed {wildcards.eseed}"


def task_files(eval_dir, tasks):
    """Each task's lm-eval result and per-problem samples in one directory (wildcards in `eval_dir` kept)."""
    return [f"{eval_dir}/{t}{ext}" for t in tasks for ext in (".json", ".samples.jsonl")]


def eval_files(eval_dir, tasks=None):
    """Every evaluation seed's lm-eval result and per-problem samples of each task under one evaluation directory."""
    return [f for s in EVAL_SEEDS for f in task_files(eval_seed_dir(eval_dir, s), tasks or BENCHMARKS)]


def eval_outputs(eval_dir):
    """One lm_eval job's files under `eval_dir`: its {task}'s pair, or every benchmark's (evaluation.jobs per_model)."""
    return task_files(eval_dir, BENCHMARKS if PER_MODEL_EVAL else ["{task}"])


def eval_job(*dirs):
    """One lm_eval job's log or benchmark path: `dirs`, then its {task} unless evaluation.jobs is per_model."""
    return os.path.join(*dirs, *([] if PER_MODEL_EVAL else ["{task}"]))


def eval_tasks(wildcards):
    """The --tasks of one lm_eval job (see eval_outputs)."""
    return wildcards.task if hasattr(wildcards, "task") else " ".join(BENCHMARKS)


def task_inputs(wildcards):
    """A miniature-world task needs its data file and YAML; lm-eval's built-ins fetch their own data."""
    tasks = [wildcards.task] if hasattr(wildcards, "task") else BENCHMARKS
    return {f"data_{t}": res(f"data/{t}.jsonl") for t in tasks if t in WORLD.local_tasks}


def memory_args(block):
    """--logit-chunk / --max-tokens-per-microbatch of a config block (train or diagnose); a null chunk = the default."""
    chunk = f" --logit-chunk {block['logit_chunk']}" if block["logit_chunk"] is not None else ""
    return f"--max-tokens-per-microbatch {block['max_tokens_per_microbatch']}{chunk}"


def diagnose_device_args():
    """Where and in which precision the diagnostic jobs run (opd.engines.accel), as training."""
    d = config["diagnose"]
    return f"--device {d['device']} --dtype {d['dtype']}"


def rollout_args(wildcards):
    d = config["diagnose"]
    keys = ["n_prompts", "samples", "top_k", "temperature", "top_p", "max_new_tokens", "backend"]
    return (
        " ".join(f"--{k.replace('_', '-')} {d[k]}" for k in keys) + f" --seed {config['seed']} {prompt_args()}"
        f" {diagnose_device_args()}"
    )


def score_args(wildcards):
    return f"--top-k {config['diagnose']['top_k']} {diagnose_device_args()} {memory_args(config['diagnose'])}"


def fixed_context_args(wildcards):
    f = config["diagnose"]["fixed_context"]
    return (
        f"--selectors {' '.join(f['selectors'])} --ratio {f['ratio']} --steps {f['steps']}"
        f" --lr {f['lr']} --seed {config['seed']} {signal_args()} {diagnose_device_args()}"
        f" {memory_args(config['diagnose'])}"
        f"{' --gradient-checkpointing' if config['diagnose']['gradient_checkpointing'] else ''}"
    )


def diagnose_args(wildcards):
    d = config["diagnose"]
    return f"--bins {d['bins']} {release_args()} {signal_args()}"


def train_args(wildcards):
    keys = [
        "steps",
        "prompts_per_step",
        "samples",
        "max_new_tokens",
        "temperature",
        "lr",
        "clip_eps",
        "loss",
        "checkpoint_every",
        "rollout_backend",
        "device",
        "dtype",
        "vllm_memory_fraction",
        "sharding",
        "save_dtype",
        "keep_checkpoints",
    ]
    flags = " ".join(f"--{k.replace('_', '-')} {TRAIN[k]}" for k in keys)
    checkpointing = " --gradient-checkpointing" if TRAIN["gradient_checkpointing"] else ""
    return (
        f"{flags} {prompt_args()} {release_args()} {signal_args('--aggregation')} {memory_args(TRAIN)}"
        f"{checkpointing}{engine_args()}{optimizer_args()}{served_teacher_args(wildcards.teacher)}"
    )


def optimizer_args():
    """Optimizer, schedule and upper clip, only where they differ from the defaults (opd.engines.optim)."""
    return "".join(f" {f}" for f in optim.config_flags(TRAIN))


def engine_args():
    """Rollout/teacher engine flags, only where they differ from the defaults (an unchanged command line
    for configs that do not set them, so existing runs are not re-run)."""
    defaults = {"vllm_weight_push": "shm", "vllm_enforce_eager": "auto", "teacher_placement": "in_process"}
    flags = [
        f"--{k.replace('_', '-')} {str(TRAIN[k]).lower()}" for k, d in defaults.items() if str(TRAIN[k]).lower() != d
    ]
    flags += [f"--{k.replace('_', '-')}" for k in ("vllm_sleep", "recompute_rollout_logprobs") if TRAIN[k]]
    flags += [f"--top-p {TRAIN['top_p']}"] if TRAIN["top_p"] != 1.0 else []
    flags += [f"--teacher-device {TRAIN['teacher_device']}"] if TRAIN["teacher_device"] else []
    flags += [f"--async-rollouts {TRAIN['async_rollouts']}"] if TRAIN["async_rollouts"] else []
    return "".join(f" {f}" for f in flags)


def served_teacher_args(teacher):
    """With train.teacher_placement server: the URL of this teacher's vLLM server, and the request limits that
    differ from the defaults (opd.engines.teacher_server); nothing otherwise."""
    if TRAIN["teacher_placement"] != "server":
        return ""
    url = TRAIN["teacher_url"]
    flags = [f"--teacher-url {shlex.quote(url[teacher] if isinstance(url, dict) else url)}"]
    flags += [f"--teacher-timeout {TRAIN['teacher_timeout']}"] if TRAIN["teacher_timeout"] != 300 else []
    flags += [f"--teacher-concurrency {TRAIN['teacher_concurrency']}"] if TRAIN["teacher_concurrency"] != 4 else []
    return "".join(f" {f}" for f in flags)


def train_gpus(wildcards):
    """GPUs of a pair's training jobs: its train.pairs `gpu`, else resources.train.gpu (opd.studies.plan)."""
    return plan.pair_gpus(config, wildcards.teacher, wildcards.student)


def train_launcher(wildcards):
    """One process per GPU: torchrun (DDP or FSDP, opd.engines.distributed) when a training job has several GPUs."""
    gpus = train_gpus(wildcards)
    return f"torchrun --standalone --nproc-per-node {gpus}" if gpus > 1 else "python"


def trained_eval_outputs(*seed_dir):
    """A trained run's lm-eval files (seed_dir: "evalseed~{eseed}" for a seed > 0); its TRAIN_DIR wildcards kept."""
    return task_files(os.path.join(f"{TRAIN_DIR}/eval", *seed_dir), BENCHMARKS)


def trained_eval_flags(wildcards, threads, args=eval_args):
    """opd.studies.evaluate's flags for a trained run: eval_trained's, or train_opd's chained evaluation."""
    train_dir = TRAIN_DIR.format(**dict(wildcards.items()))
    return (
        f"--model-dir {train_dir}/model --model-name {TRAIN_ID.format(**dict(wildcards.items()))}"
        f" --tasks {' '.join(BENCHMARKS)} --out-dir {train_dir}/eval --train-dir {train_dir}"
        f" {args(wildcards)} --threads {threads} --study $OPD_STUDY"
    )


def train_then_eval(wildcards, threads):
    """What follows the training flags: nothing, or the chained evaluation (evaluation.trained with_training)."""
    return f" --then opd.studies.evaluate {trained_eval_flags(wildcards, threads)}" if EVAL_WITH_TRAINING else ""


def trained_evals():
    """Every trained run's lm-eval results and per-problem samples (the reports' intervals need both)."""
    return [f for run in sweep.runs(config["models"], TRAIN) for f in eval_files(res(f"{run.path}/eval"))]


def grid_args():
    """The flags that tell opd.studies.report_train / opd.studies.report_sweep which runs make the grid."""
    return (
        f"--pairs {' '.join(f'{t}:{s}' for t, s in PAIRS)} --methods {' '.join(TRAIN['methods'])}"
        f" --top-k {' '.join(map(str, TRAIN['top_k']))} --ratios {' '.join(map(str, TRAIN['ratio']))}"
        f" --seeds {' '.join(map(str, TRAIN['seeds']))} --student-builds {TRAIN['student_builds']}"
        f" --tasks {' '.join(BENCHMARKS)} --results {RESULTS}"
    )


def bench_args():
    """Which benchmarks are out-of-domain, the metric read from each lm-eval result, the evaluation seeds."""
    e = config["evaluation"]
    metrics = " ".join(f"{t}={m}" for t, m in e["metrics"].items())
    return (
        f"--ood-tasks {' '.join(e['ood_benchmarks'])}"
        + (f" --metric {metrics}" if metrics else "")
        + (f" --eval-seeds {' '.join(map(str, EVAL_SEEDS))}" if EVAL_SEEDS != [0] else "")
    )


def all_outputs():
    """The reports, and every grid point's evaluation itself: a run added to the grid is then a missing
    target of the default target, which no --rerun-triggers setting can skip (an up-to-date report may miss
    inputs, since Snakemake takes them for deleted temp() files; README, "Re-running")."""
    reports = [f"{REPORT_DIR}/{name}" for name in ("models.md", "models.csv", "models.png", "training.md")]
    if sweep.is_sweep(TRAIN):
        reports.append(f"{REPORT_DIR}/sweep.md")
    if config["evaluation"]["reference"]:
        reports.append(f"{REPORT_DIR}/reference.md")
    # One file per run and evaluation seed is enough to make its eval job a target (all 2 x benchmarks would
    # add thousands of targets at paper scale and double the dry run's DAG time); the reports' inputs still
    # list every file.
    runs = [
        f"{eval_seed_dir(res(f'{run.path}/eval'), s)}/{BENCHMARKS[0]}.json"
        for run in sweep.runs(config["models"], TRAIN)
        for s in EVAL_SEEDS
    ]
    return [*reports, f"{REPORT_DIR}/diagnose/report.md", *runs]
