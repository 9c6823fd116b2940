"""Cost planner: the estimated GPU-hours of every GPU job of a study, per phase, before any job runs.

`python -m opd.studies.plan --configfile config/paper.yaml --gpu h100` prints it after the memory table
(`--json` for a machine-readable plan); with `resources.gpu_type` set the workflow estimates it at
validation (workflow/rules/common.smk) and, with `resources.budget_gpu_hours`, stops a study whose estimate
exceeds the budget, naming the three biggest drivers. The model (docs/cost.md): each phase's FLOPs and bytes
from the models' shapes (the memory planner's, opd.studies.shapes.model_shape), seconds = the larger of
FLOPs / (peak x `resources.cost.compute_efficiency`) and bytes / (bandwidth x
`resources.cost.bandwidth_efficiency`); a training step adds its phases (with `train.async_rollouts: 1` the
rollouts overlap the rest: the larger of the two); a job's GPU-hours = its seconds x its GPUs. Response
lengths are `max_new_tokens` unless `resources.cost.*_response_tokens` says otherwise (an upper bound).
"""

from __future__ import annotations

import dataclasses
import math

from opd.infra.hardware import Gpu, gpu as find_gpu
from opd.infra.io import InputError
from opd.studies import benchmarks
from opd.studies import cost_model as cm
from opd.studies.shapes import (GIB, HF_GENERATE_SEQS, PROMPT_TOKENS, VLLM_ROLLOUT_FRACTION, Shape, model_shape,
                                pair_gpus)

VLLM_RESERVE = 2 * GIB  # vLLM's share beyond weights and KV cache: activations of its profile run, CUDA graphs
# Problems per benchmark (published sizes; docs/paper.md's table); resources.cost.eval_problems overrides.
BENCHMARK_PROBLEMS = {"minerva_math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "olympiadbench": 675,
                      "gpqa_diamond_cot_zeroshot": 198, "ifeval": 541, "humaneval": 164,
                      "humaneval_instruct": 164}
TRAINING_RULES = ("train_opd", "serve_teacher")


@dataclasses.dataclass(frozen=True)
class Assumptions:
    gpu: Gpu
    compute_efficiency: float
    bandwidth_efficiency: float
    train_response: int
    diagnose_response: int
    eval_response: int


@dataclasses.dataclass
class Phase:
    name: str
    flops: float
    bytes: float
    seconds: float = 0.0
    bound: str = ""  # compute | memory

    def timed(self, a: Assumptions) -> "Phase":
        compute = self.flops / (a.gpu.bf16_flops * a.compute_efficiency)
        memory = self.bytes / (a.gpu.bandwidth * a.bandwidth_efficiency)
        self.seconds, self.bound = max(compute, memory), "compute" if compute >= memory else "memory"
        return self


@dataclasses.dataclass
class JobCost:
    rule: str
    job: str
    count: int  # jobs of the study with this estimate (e.g. every run of a pair)
    gpus: int
    phases: list[Phase]
    repeats: int = 1  # the phases run this many times per job (training steps)
    notes: dict = dataclasses.field(default_factory=dict)  # decode concurrency and waves, tokens assumed
    overlap: bool = False  # async rollouts: a step takes the larger of rollouts and the rest

    @property
    def seconds(self) -> float:
        """One job's wall-clock estimate."""
        times = {p.name: p.seconds for p in self.phases}
        if self.overlap:
            roll = sum(v for k, v in times.items() if k.startswith("rollout"))
            return self.repeats * max(roll, sum(times.values()) - roll)
        return self.repeats * sum(times.values())

    @property
    def gpu_hours(self) -> float:
        """Every job of the group together."""
        return self.count * self.gpus * self.seconds / 3600

    def phase_hours(self) -> dict[str, float]:
        scale = self.count * self.gpus * self.repeats / 3600
        return {p.name: scale * p.seconds for p in self.phases}


def assumptions(config: dict, gpu_name: str | None = None, key: str = "resources.gpu_type") -> Assumptions:
    """The GPU (`gpu_name`, else resources.gpu_type) and the config's cost assumptions; InputError naming the key."""
    res, cost = config["resources"], config["resources"]["cost"]
    name = gpu_name or res.get("gpu_type")
    if not name:
        raise InputError("no GPU to cost the study on: set resources.gpu_type or pass --gpu")
    problems = response_problems(config)
    if problems:
        raise InputError("; ".join(problems))
    return Assumptions(find_gpu(name, key), cost["compute_efficiency"], cost["bandwidth_efficiency"],  # schema defaults
                       cost.get("train_response_tokens") or config["train"]["max_new_tokens"],
                       cost.get("diagnose_response_tokens") or config["diagnose"]["max_new_tokens"],
                       cost.get("eval_response_tokens") or config["evaluation"]["max_gen_toks"])


def response_problems(config: dict) -> list[str]:
    """A response-length assumption above the longest response it stands for."""
    cost = config["resources"].get("cost") or {}
    limits = {"train_response_tokens": ("train.max_new_tokens", config["train"]["max_new_tokens"]),
              "diagnose_response_tokens": ("diagnose.max_new_tokens", config["diagnose"]["max_new_tokens"]),
              "eval_response_tokens": ("evaluation.max_gen_toks", config["evaluation"]["max_gen_toks"])}
    return [f"resources.cost.{k}: {cost[k]} is above {name} ({limit}): a response cannot be longer than the limit"
            for k, (name, limit) in limits.items() if cost.get(k) is not None and cost[k] > limit]


def rollout_phases(S: Shape, seqs: int, response: int, kv_budget: float, a: Assumptions, max_seqs: int,
                   weight_bytes: int = 2, key: str = "", label: str = "rollout") -> tuple[list[Phase], dict]:
    """Prefill (compute-bound, causal) and decode (memory-bound: opd.studies.cost_model.decode); `key`: the
    setting that gives the KV budget, for the message when it cannot hold one sequence."""
    try:
        weights = weight_bytes * S.params()
        d = cm.decode(S, seqs, PROMPT_TOKENS, response, kv_budget, weights, max_seqs, dtype_bytes=weight_bytes)
    except ValueError as err:
        raise InputError(f"{key} on {a.gpu.label}: {err}") from None
    prefill = Phase(f"{label} prefill", cm.forward_flops(S, seqs, PROMPT_TOKENS, 1, "causal"), d.waves * weights)
    budget = None if math.isinf(kv_budget) else round(kv_budget / GIB, 2)  # None: hf generate, no KV budget
    notes = {"decode_concurrent": d.concurrent, "decode_waves": d.waves, "kv_budget_gib": budget,
             "response_tokens": response, "prompt_tokens": PROMPT_TOKENS}
    return [prefill.timed(a), Phase(f"{label} decode", d.flops, d.bytes).timed(a)], notes


def vllm_kv_budget(S: Shape, fraction: float, a: Assumptions) -> float:
    """vLLM's KV cache: its share of the GPU less the bf16 weights and its reserve."""
    return fraction * a.gpu.memory_gb * GIB - 2 * S.params() - VLLM_RESERVE


def served_teacher_gpus(config: dict) -> int:
    """GPUs of a teacher served on its own (train.teacher_placement: server, issue 23): the scoring of every
    rank is timed on them, and their busy time is a `serve_teacher` row of its own (the server is shared by
    every training job of its teacher, so no one job owns it). 0 for a teacher in the trainer's process or
    worker. One GPU per server, as the memory planner's `serve` rows place it (a tensor-parallel server is
    started by hand with its own GPU count, which the config does not hold)."""
    return 1 if config["train"].get("teacher_placement") == "server" else 0


def serve_teacher_jobs(config: dict, trains: list[JobCost], a: Assumptions) -> list[JobCost]:
    """One row per served teacher: the scoring FLOPs of every step of every rank of every run it serves, on its
    GPUs at the compute efficiency: busy time, a lower bound (a server also idles while the ranks decode)."""
    served = served_teacher_gpus(config)
    out: dict[str, JobCost] = {}
    for j in trains if served else []:
        teacher = j.job.split()[1]
        flops = j.count * j.repeats * j.gpus * next(p.flops for p in j.phases if p.name == "teacher scoring")
        row = out.setdefault(teacher, JobCost("serve_teacher", f"serve_teacher {teacher}", 1, served,
                                              [Phase("teacher scoring (busy)", 0, 0)]))
        row.phases[0].flops += flops
    for row in out.values():
        row.phases[0].timed(a).seconds /= served
    return list(out.values())


def train_job(config: dict, pair: tuple[str, str], S: Shape, T: Shape, a: Assumptions, count: int) -> JobCost:
    """One training job of a pair: per rank and step, rollouts, recompute, teacher scoring, update, AdamW."""
    tr = config["train"]
    gpus = max(1, pair_gpus(config, *pair))
    seqs = math.ceil(tr["prompts_per_step"] / gpus) * tr["samples"]
    R, L = a.train_response, PROMPT_TOKENS + a.train_response
    budget = tr["max_tokens_per_microbatch"]
    reads = lambda m, passes=1: cm.weight_reads(m.params(), seqs, L, budget, passes)  # noqa: E731
    if tr["rollout_backend"] == "vllm":
        kv = vllm_kv_budget(S, tr["vllm_memory_fraction"], a)
        phases, notes = rollout_phases(S, seqs, R, kv, a, cm.VLLM_MAX_SEQS, key="train.vllm_memory_fraction")
    else:
        phases, notes = rollout_phases(S, seqs, R, math.inf, a, HF_GENERATE_SEQS, 2 if tr["dtype"] == "bfloat16" else 4)
    if tr.get("recompute_rollout_logprobs"):
        phases.append(Phase("student recompute", cm.forward_flops(S, seqs, L, R), reads(S)).timed(a))
    served = served_teacher_gpus(config)
    scoring = Phase("teacher scoring", cm.forward_flops(T, seqs, L, R), reads(T)).timed(a)
    if served:  # every rank's sequences on the server's GPUs, the trainer waiting for them
        scoring.seconds *= gpus / served
    shard = gpus if tr.get("sharding") == "fsdp" else 1
    ckpt = bool(tr.get("gradient_checkpointing"))
    update = {c: Phase("update", cm.update_flops(S, seqs, L, R, c), reads(S, 3 + c)).timed(a)
              for c in (ckpt, not ckpt)}
    phases += [scoring, update[ckpt], Phase("optimizer", 0, cm.adam_bytes(S.params() / shard)).timed(a)]
    notes.update(sharding=tr.get("sharding", "ddp"), sequences_per_rank=seqs, served_teacher_gpus=served)
    notes[f"update_seconds_checkpointing_{'off' if ckpt else 'on'}"] = round(update[not ckpt].seconds, 1)
    return JobCost("train_opd", f"train {pair[0]} -> {pair[1]}", count, gpus, phases, tr["steps"], notes,
                   overlap=bool(tr.get("async_rollouts")))


def benchmark_problems(config: dict, task: str) -> int:
    """Problems of one lm-eval task: resources.cost.eval_problems, the world's own tasks (world.n_bench),
    else the published size; evaluation.limit caps it (a count, or a fraction below 1)."""
    from opd import worlds

    given = (config["resources"].get("cost") or {}).get("eval_problems") or {}
    if task in given:
        n = given[task]
    elif task in worlds.get(config["world"]["name"]).local_tasks:
        n = config["world"]["n_bench"]
    elif task in BENCHMARK_PROBLEMS:
        n = BENCHMARK_PROBLEMS[task]
    else:
        raise InputError(f"resources.cost.eval_problems.{task}: the cost planner does not know how many problems "
                         f"benchmark {task!r} has; set it")
    limit = config["evaluation"].get("limit")
    return n if not limit else min(n, int(limit) if limit >= 1 else math.ceil(limit * n))


def eval_phases(config: dict, S: Shape, tasks: list[str], a: Assumptions) -> tuple[list[Phase], dict]:
    """One lm-eval job (one evaluation seed) with vLLM: each task's problems decoded at the eval response length."""
    ev = config["evaluation"]
    seqs = sum(benchmark_problems(config, t) for t in tasks)
    if ev["backend"] == "vllm":
        fraction = (ev.get("model_args") or {}).get("gpu_memory_utilization", 0.9)
        phases, notes = rollout_phases(S, seqs, a.eval_response, vllm_kv_budget(S, fraction, a), a, cm.VLLM_MAX_SEQS,
                                       key="evaluation.model_args.gpu_memory_utilization", label="generation")
    else:
        phases, notes = rollout_phases(S, seqs, a.eval_response, math.inf, a, HF_GENERATE_SEQS, label="generation")
    return phases, {**notes, "sequences": seqs}


def eval_jobs(config: dict, shapes: dict, a: Assumptions) -> list[JobCost]:
    """lm_eval: one job per (model, benchmark, evaluation seed), or per (model, seed) with every benchmark
    (evaluation.jobs per_model); eval_trained: one job per (run, evaluation seed), every benchmark (the
    `_seeded` rules of seeds > 0 are counted with them)."""
    from opd.studies import sweep

    ev, gpus = config["evaluation"], max(1, config["resources"]["eval"]["gpu"])
    seeds = len(ev.get("seeds") or [0])
    out = []
    for name in ev.get("models") or list(config["models"]):
        groups = [ev["benchmarks"]] if ev.get("jobs") == "per_model" else [[t] for t in ev["benchmarks"]]
        for tasks in groups:
            phases, notes = eval_phases(config, shapes[name], tasks, a)
            out.append(JobCost("lm_eval", f"lm_eval {name} {' '.join(tasks)}", seeds, gpus, phases, notes=notes))
    runs = sweep.runs(config["models"], config["train"])
    for t, s in sweep.pairs(config["models"], config["train"]):
        n = seeds * sum(1 for r in runs if (r.teacher, r.student) == (t, s))
        phases, notes = eval_phases(config, shapes[s], ev["benchmarks"], a)
        out.append(JobCost("eval_trained", f"eval_trained {t} -> {s}", n, gpus, phases, notes=notes))
    return out


def diagnose_jobs(config: dict, pair: tuple[str, str], S: Shape, T: Shape, a: Assumptions) -> list[JobCost]:
    """rollout_initial (per student), score_initial and fixed_context (per pair) on the diagnose block's bank."""
    d, gpus = config["diagnose"], max(1, config["resources"]["diagnose"]["gpu"])
    fc = d["fixed_context"]
    seqs, R = d["n_prompts"] * d["samples"], a.diagnose_response
    L = PROMPT_TOKENS + R
    if d["backend"] == "vllm":
        phases, notes = rollout_phases(S, seqs, R, vllm_kv_budget(S, VLLM_ROLLOUT_FRACTION, a), a, cm.VLLM_MAX_SEQS,
                                       key="diagnose.backend vllm (gpu_memory_utilization 0.85)")
    else:
        phases, notes = rollout_phases(S, seqs, R, math.inf, a, HF_GENERATE_SEQS, 2 if d["dtype"] == "bfloat16" else 4)
    kl = cm.forward_flops(T, seqs, L, R) + cm.forward_flops(S, seqs, L, R)  # both models at every position
    reads = lambda passes: cm.weight_reads(S.params(), seqs, L, d["max_tokens_per_microbatch"], passes)  # noqa: E731
    kl_reads = reads(1) + cm.weight_reads(T.params(), seqs, L, d["max_tokens_per_microbatch"])
    ckpt = bool(d.get("gradient_checkpointing"))
    per_selector = cm.forward_flops(S, seqs, L, R) + fc["steps"] * cm.update_flops(S, seqs, L, R, ckpt) + kl  # old lp
    selectors = len(fc["selectors"])
    return [
        JobCost("rollout_initial", f"rollout_initial {pair[1]}", 1, gpus, phases, notes=notes),
        JobCost("score_initial", f"score_initial {pair[0]} / {pair[1]}", 1, gpus,
                [Phase("teacher scoring", kl, kl_reads).timed(a)]),
        JobCost("fixed_context", f"fixed_context {pair[0]} / {pair[1]}", 1, gpus,
                [Phase("base KL", kl, kl_reads).timed(a),
                 Phase("selectors' steps and KL", selectors * per_selector,
                       selectors * (reads(1) + fc["steps"] * (reads(3 + ckpt) + cm.adam_bytes(S.params())) + kl_reads)
                       ).timed(a)],
                notes={"selectors": selectors, "steps": fc["steps"]}),
    ]


def plan_costs(config: dict, gpu_name: str | None = None, key: str = "resources.gpu_type") -> list[JobCost]:
    """Every GPU job of the study, grouped where jobs share an estimate; InputError on bad input or a missing shape."""
    from opd.studies import sweep

    a = assumptions(config, gpu_name, key)
    shapes = {}
    for name in config["models"]:
        shapes[name], problems = model_shape(config, name)
        if problems:
            raise InputError("; ".join(problems))
    pairs = sweep.pairs(config["models"], config["train"])
    runs = sweep.runs(config["models"], config["train"])
    out = [train_job(config, p, shapes[p[1]], shapes[p[0]], a, sum(1 for r in runs if (r.teacher, r.student) == p))
           for p in pairs]
    out += serve_teacher_jobs(config, out, a)
    out += eval_jobs(config, shapes, a)
    for p in pairs:
        out += diagnose_jobs(config, p, shapes[p[1]], shapes[p[0]], a)
    unique = {j.job: j for j in out}  # a student's rollouts serve every pair it is in
    return list(unique.values())


def totals(jobs: list[JobCost]) -> dict:
    """GPU-hours by rule, training / evaluation / diagnostics, and all."""
    by_rule: dict[str, float] = {}
    for j in jobs:
        by_rule[j.rule] = by_rule.get(j.rule, 0.0) + j.gpu_hours
    train = sum(v for k, v in by_rule.items() if k in TRAINING_RULES)
    evaluation = sum(v for k, v in by_rule.items() if k in ("lm_eval", "eval_trained"))
    return {"by_rule": by_rule, "training": train, "evaluation": evaluation,
            "diagnostics": sum(by_rule.values()) - train - evaluation, "total": sum(by_rule.values())}


def drivers(jobs: list[JobCost], n: int = 3) -> list[tuple[str, float]]:
    """The n largest (job, phase) contributions to the study's GPU-hours."""
    parts = [(f"{j.job}: {phase}", h) for j in jobs for phase, h in j.phase_hours().items()]
    return sorted(parts, key=lambda x: -x[1])[:n]


def config_problems(config: dict) -> list[str]:
    """Validation check: bad cost assumptions; with resources.gpu_type the estimate itself, and with
    resources.budget_gpu_hours a study whose estimate exceeds it (the estimate and its three biggest drivers)."""
    if benchmarks.config_problems(config):
        return []  # an unknown benchmark: its own check names it, and nothing can be costed for it
    res = config["resources"]
    budget, name = res.get("budget_gpu_hours"), res.get("gpu_type")
    if not name:
        problems = response_problems(config)
        return problems + (["resources.budget_gpu_hours needs resources.gpu_type (the GPU the estimate is for)"]
                           if budget is not None else [])
    try:
        jobs = plan_costs(config)
    except InputError as err:
        return [str(err)]
    total = totals(jobs)
    if budget is None or total["total"] <= budget:
        return []
    top = "; ".join(f"{i}) {what} {h:,.0f} GPU-h ({100 * h / total['total']:.0f}%)"
                    for i, (what, h) in enumerate(drivers(jobs), 1))
    return [f"resources.budget_gpu_hours: the study is estimated at {total['total']:,.0f} GPU-hours on "
            f"{find_gpu(name).label} (training {total['training']:,.0f}, evaluation {total['evaluation']:,.0f}, "
            f"diagnostics {total['diagnostics']:,.0f}), over the budget of {budget:,.0f}; biggest drivers: {top} "
            f"(python -m opd.studies.plan --gpu {name} shows every job)"]


def _num(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def table(jobs: list[JobCost], a: Assumptions) -> str:
    """Markdown: each job group's phases (FLOPs, bytes, seconds, what bounds them), its step or job time and
    GPU-hours, then the totals by rule and the biggest drivers."""
    head = ("| job | jobs | GPUs | phase | TFLOP | GB moved | seconds | bound | wall hours per job "
            "| GPU-hours (all jobs) |\n" + "|---" * 10 + "|")
    rows = [f"Cost on {a.gpu.label} ({a.gpu.bf16_flops / 1e12:g} TFLOP/s dense bf16 x {a.compute_efficiency:g}, "
            f"{a.gpu.bandwidth / 1e12:g} TB/s x {a.bandwidth_efficiency:g}); response tokens assumed: training "
            f"{a.train_response}, diagnostics {a.diagnose_response}, evaluation {a.eval_response}; prompts "
            f"{PROMPT_TOKENS} (python -m opd.studies.plan; docs/cost.md)", "", head]
    for j in jobs:
        unit = "per step" if j.repeats > 1 else "per job"
        for p in j.phases:
            rows.append(f"| {j.job} | {j.count} | {j.gpus} | {p.name} | {_num(p.flops / 1e12)} | {_num(p.bytes / 1e9)} "
                        f"| {_num(p.seconds)} | {p.bound} | | |")
        steps = f" (x {j.repeats} steps)" if j.repeats > 1 else ""
        rows.append(f"| {j.job} | {j.count} | {j.gpus} | **{unit}**{steps} | | | {_num(j.seconds / j.repeats)} | "
                    f"| {_num(j.seconds / 3600)} | **{_num(j.gpu_hours)}** |")
        shown = {k: v for k, v in j.notes.items() if k.startswith(("decode", "kv", "served", "update")) and v}
        if shown:
            rows.append(f"| {j.job} | | | *{', '.join(f'{k} {v}' for k, v in shown.items())}* | | | | | | |")
    t = totals(jobs)
    rows += ["", "| rule | GPU-hours |", "|---|---|"] + [f"| {k} | {_num(v)} |" for k, v in t["by_rule"].items()]
    rows += [f"| **training** | {_num(t['training'])} |", f"| **evaluation** | {_num(t['evaluation'])} |",
             f"| **diagnostics** | {_num(t['diagnostics'])} |", f"| **total** | **{_num(t['total'])}** |", "",
             "Biggest drivers: " + "; ".join(f"{what} {_num(h)} GPU-h" for what, h in drivers(jobs))]
    return "\n".join(rows)


def to_json(jobs: list[JobCost], a: Assumptions) -> dict:
    assumed = {k: v for k, v in dataclasses.asdict(a).items() if k != "gpu"}
    return {"gpu": dataclasses.asdict(a.gpu), "assumptions": assumed,
            "jobs": [{"rule": j.rule, "job": j.job, "count": j.count, "gpus": j.gpus, "steps": j.repeats,
                      "phases": [dataclasses.asdict(p) for p in j.phases], "seconds_per_job": j.seconds,
                      "gpu_hours": j.gpu_hours, "notes": j.notes} for j in jobs],
            "totals": totals(jobs), "drivers": [{"what": w, "gpu_hours": h} for w, h in drivers(jobs, 5)]}


def add_args(p) -> None:
    """The planner's cost flags (opd.studies.plan)."""
    p.add_argument("--gpu", default=None,
                   help="GPU to cost the study on (overrides resources.gpu_type): one of the hardware table's names, "
                        "e.g. h100, h200 (opd.infra.hardware)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (memory and cost) instead of tables")


def report(config: dict, args) -> tuple[str | None, dict | None]:
    """The cost table and JSON for `--gpu` or resources.gpu_type; (None, None) when neither names a GPU."""
    name = args.gpu or config["resources"].get("gpu_type")
    if not name:
        return None, None
    key = "--gpu" if args.gpu else "resources.gpu_type"
    jobs = plan_costs(config, name, key)
    a = assumptions(config, name, key)
    return table(jobs, a), to_json(jobs, a)
