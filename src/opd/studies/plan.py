"""Memory planner: the estimated peak GPU memory of every training and diagnostic job, before any job runs.

`python -m opd.studies.plan --configfile config/paper.yaml` prints, per job, the terms below and the
largest settings that fit, and exits 1 where the workflow would refuse: `config_problems` is one of its
parse-time checks (`opd.studies.validate.CHECKS`), so a job over `resources.<kind>.gpu_mem_gb` stops the run.
Pure Python (no torch): planning a 1874-job DAG offline stays fast.
With `--gpu` (or `resources.gpu_type`) it prints the cost plan too: GPU-hours per job and study (opd.studies.cost).

Shapes: `<results_dir>/models/<name>/config.json` when on disk, else the `shape` block over the table of
`opd.studies.hub_shapes` (a miniature model: its architecture keys), so planning works offline; a `shape`
key that contradicts config.json is an error. The terms, per GPU (G = resources.train.gpu, bytes):
- student: fp32 master weights 4P, gradients 4P, AdamW moments 8P; with `train.sharding: fsdp` each divided by G, plus
  the all-gathered bf16 root group and two layers (FSDP prefetches one), plus the unsharded replica rollouts and
  scoring read (opd.engines.distributed); DDP (G > 1) adds its 4P gradient buckets;
- teacher: 2 (bf16) or 4 (fp32) bytes per parameter, 0 if served (a `serve` row); vLLM: `vllm_memory_fraction` of a GPU;
- activations of one micro-batch of `train.max_tokens_per_microbatch` tokens (all of a rank's batch when
  unset) kept for backward: `layer_elements` per token and layer without checkpointing; with
  `train.gradient_checkpointing`, each layer's input plus one layer recomputed;
- one logit chunk: `train.logit_chunk` positions (when unset, the engines' default for the model's vocabulary,
  `opd.infra.memory.chunk_positions`; at most a micro-batch) × V × LOGIT_BYTES.
The peak is the static terms plus the largest phase: the update (activations + logits), teacher scoring (a no-grad
forward of one micro-batch) or hf rollouts (a KV cache); a term on the GPU in one phase only (the fixed-context job's
teacher, on the host during the τ steps, and the τ steps' gradients and AdamW state) counts in that phase. The
diagnostics use the `diagnose` block's memory keys; `tests/test_plan.py` checks the estimate against CPU peaks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from opd.infra import cli
from opd.infra.memory import chunk_positions
from opd.studies.shapes import (GIB, HF_GENERATE_SEQS, NEEDS_SHAPE, PROMPT_TOKENS,  # noqa: F401 (re-exported)
                                VLLM_ROLLOUT_FRACTION, Shape, model_shape, pair_gpus, shape_from_config_json)

LOGIT_BYTES = {4: 16, 2: 20}  # per [position, V] element: logits, log-softmax and their two gradients


@dataclasses.dataclass
class Settings:
    """What a job's memory depends on besides the shapes (from the config's train/diagnose/resources)."""
    gpus: int
    sharding: str
    compute_bytes: int  # 2 for --dtype bfloat16 (autocast, a bf16 teacher), 4 for float32
    rank_tokens: int  # prompt + response tokens of one rank's share of a step
    microbatch: int | None  # train.max_tokens_per_microbatch (None: the whole share at once)
    logit_chunk: int | None
    checkpointing: bool
    vllm_fraction: float  # 0 with hf rollouts
    kv_sequences: int  # sequences in one hf generate() call (0 with vLLM)
    seq_tokens: int  # prompt + longest response

    @property
    def tokens(self) -> int:
        return min(self.microbatch or self.rank_tokens, self.rank_tokens)

    def chunk(self, vocab: int) -> int:
        """LM-head positions per chunk for this vocabulary: the engines' rule, at most one micro-batch."""
        return min(chunk_positions(self.logit_chunk, vocab), self.tokens)


def activation_bytes(s: Shape, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Kept for backward by one micro-batch: every layer's activations, or (checkpointing) every layer's
    fp32 input plus one layer recomputed; plus embedding output and final norm (4H)."""
    per_layer = s.layer_elements() * compute_bytes
    trunk = 4 * s.hidden_size * compute_bytes
    if checkpointing:
        return tokens * (s.num_hidden_layers * s.hidden_size * 4 + per_layer + trunk)
    return tokens * (s.num_hidden_layers * per_layer + trunk)


def logit_bytes(s: Shape, positions: int, compute_bytes: int) -> int:
    return positions * s.vocab_size * LOGIT_BYTES[compute_bytes]


def update_bytes(s: Shape, st: Settings) -> int:
    """A backward of one micro-batch: its activations and one logit chunk."""
    return (activation_bytes(s, st.tokens, st.compute_bytes, st.checkpointing)
            + logit_bytes(s, st.chunk(s.vocab_size), st.compute_bytes))


def student_bytes(s: Shape, st: Settings) -> dict[str, float]:
    """Weights, gradients, AdamW moments (fp32) per GPU, and what the sharding mode adds."""
    shard = st.gpus if st.sharding == "fsdp" else 1
    P = s.params()
    out = {"student weights": 4 * P / shard, "gradients": 4 * P / shard, "AdamW state": 8 * P / shard}
    if st.sharding == "fsdp" and st.gpus > 1:
        out["FSDP all-gathered"] = st.compute_bytes * (s.root_params() + 2 * s.layer_params())
        out["FSDP replica"] = st.compute_bytes * P
    elif st.gpus > 1:
        out["DDP buckets"] = 4 * P
    return out


def scoring_bytes(models: list[Shape], st: Settings) -> float:
    """A no-grad forward of one micro-batch: the widest live tensors per token and one chunk's logits."""
    return max(st.tokens * (4 * m.hidden_size + 2 * m.intermediate_size + m.q + 2 * m.kv) * st.compute_bytes
               + st.chunk(m.vocab_size) * m.vocab_size * (st.compute_bytes + 8) for m in models)


def kv_cache_bytes(s: Shape, st: Settings) -> float:
    return st.kv_sequences * st.seq_tokens * s.num_hidden_layers * 2 * s.kv * st.compute_bytes


@dataclasses.dataclass
class Estimate:
    job: str
    kind: str  # train | diagnose (the resources block it is checked against)
    static: dict[str, float]
    phases: dict[str, float]
    cap_gib: float | None
    settings: Settings
    held: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # phase -> terms only it holds

    def terms(self) -> dict[str, float]:
        """Every named term, static or held by one phase (the table's columns)."""
        return {**self.static, **{k: v for terms in self.held.values() for k, v in terms.items()}}

    @property
    def peak(self) -> float:
        return sum(self.static.values()) + max((v + sum(self.held.get(p, {}).values()) for p, v in self.phases.items()),
                                               default=0.0)

    @property
    def fits(self) -> bool:
        return self.cap_gib is None or self.peak <= self.cap_gib * GIB


def train_settings(config: dict, pair: tuple[str, str] | None = None, **override) -> tuple[Settings, float | None]:
    tr, res = config["train"], config["resources"]["train"]
    gpus = max(1, pair_gpus(config, *pair) if pair else res.get("gpu", 0))
    cap = res.get("gpu_mem_gb")
    vllm = tr["rollout_backend"] == "vllm"
    seq = PROMPT_TOKENS + tr["max_new_tokens"]
    st = Settings(gpus=gpus, sharding=tr.get("sharding", "ddp"),
                  compute_bytes=2 if tr["dtype"] == "bfloat16" else 4,
                  rank_tokens=math.ceil(tr["prompts_per_step"] / gpus) * tr["samples"] * seq,
                  microbatch=tr.get("max_tokens_per_microbatch"), logit_chunk=tr.get("logit_chunk"),
                  checkpointing=bool(tr.get("gradient_checkpointing")),
                  vllm_fraction=tr["vllm_memory_fraction"] if vllm else 0.0,
                  kv_sequences=0 if vllm else min(HF_GENERATE_SEQS,
                                                  math.ceil(tr["prompts_per_step"] / gpus) * tr["samples"]),
                  seq_tokens=seq)
    st = dataclasses.replace(st, **override)
    if "gpus" in override:
        st = dataclasses.replace(st, rank_tokens=math.ceil(tr["prompts_per_step"] / st.gpus) * tr["samples"] * seq)
    return st, cap


def train_estimate(config: dict, pair: tuple[str, str], S: Shape, T: Shape, **override) -> Estimate:
    """One training job of a (teacher, student) pair: peak memory per GPU."""
    st, cap = train_settings(config, pair, **override)
    served = config["train"].get("teacher_placement") == "server"  # the teacher on its server's GPU ("serve" rows)
    static = {**student_bytes(S, st), "teacher": 0 if served else st.compute_bytes * T.params(),
              "vLLM share": st.vllm_fraction * (cap or 80) * GIB, "CUDA context": 1.0 * GIB}
    phases = {"update": update_bytes(S, st), "scoring": 0 if served else scoring_bytes([T, S], st),
              "hf rollouts": kv_cache_bytes(S, st)}
    return Estimate(f"train {pair[0]} -> {pair[1]}", "train", static, phases, cap, st)


def diagnose_estimates(config: dict, pair: tuple[str, str], S: Shape, T: Shape) -> list[Estimate]:
    """Rollouts of the student, teacher scoring, and the fixed-context gain (τ Adam steps on the bank)."""
    d, res = config["diagnose"], config["resources"]["diagnose"]
    cap = res.get("gpu_mem_gb")
    st, _ = train_settings(config, gpus=1, sharding="ddp", vllm_fraction=0.0,
                           kv_sequences=0 if d["backend"] == "vllm" else min(HF_GENERATE_SEQS,
                                                                              d["n_prompts"] * d["samples"]),
                           seq_tokens=PROMPT_TOKENS + d["max_new_tokens"], microbatch=d["max_tokens_per_microbatch"],
                           logit_chunk=d["logit_chunk"], checkpointing=bool(d.get("gradient_checkpointing")))
    st = dataclasses.replace(st, rank_tokens=d["n_prompts"] * d["samples"] * st.seq_tokens)
    ctx = {"CUDA context": 1.0 * GIB}
    weights = lambda m: st.compute_bytes * m.params()  # noqa: E731
    vllm = {"vLLM share": VLLM_ROLLOUT_FRACTION * (cap or 80) * GIB}  # its gpu_memory_utilization
    rollout_static = vllm if d["backend"] == "vllm" else {"student weights": weights(S)}
    return [
        Estimate(f"rollout_initial {pair[1]}", "diagnose", {**rollout_static, **ctx},
                 {"hf rollouts": kv_cache_bytes(S, st)}, cap, st),
        Estimate(f"score_initial {pair[0]} / {pair[1]}", "diagnose",
                 {"teacher": weights(T), "student weights": weights(S), **ctx}, {"scoring": scoring_bytes([T, S], st)},
                 cap, st),
        fixed_context_estimate(pair, S, T, st, cap),
    ]


def fixed_context_estimate(pair: tuple[str, str], S: Shape, T: Shape, st: Settings, cap: float | None) -> Estimate:
    """One fp32 student on the GPU throughout (S0 waits on the host); its gradients and AdamW state only in
    the τ steps ("update"), the teacher only in the bank's KL passes ("scoring"; opd.studies.fixed_context)."""
    student = student_bytes(S, st)
    return Estimate(f"fixed_context {pair[0]} / {pair[1]}", "diagnose",
                    {"student weights": student.pop("student weights"), "CUDA context": 1.0 * GIB},
                    {"update": update_bytes(S, st), "scoring": scoring_bytes([T, S], st)}, cap, st,
                    held={"update": student, "scoring": {"teacher": st.compute_bytes * T.params()}})


def estimates(config: dict) -> tuple[list[Estimate], list[str]]:
    """Every training pair's and diagnostic job's estimate (one per pair), and shape problems."""
    from opd.studies import sweep

    shapes, problems = {}, []
    for name in config["models"]:
        shapes[name], found = model_shape(config, name)
        problems += found
    out = []
    for t, s in sweep.pairs(config["models"], config["train"]):
        if shapes[t] and shapes[s]:
            out.append(e := train_estimate(config, (t, s), shapes[s], shapes[t]))
            if config["train"].get("teacher_placement") == "server":  # bf16 weights; vLLM's KV cache fills the rest
                out.append(Estimate(f"serve {t}", "serve", {"teacher": 2 * shapes[t].params()}, {}, None, e.settings))
            out += diagnose_estimates(config, (t, s), shapes[s], shapes[t])
    unique = {e.job: e for e in out}  # a student's rollouts serve every pair it is in
    return list(unique.values()), problems


def _pair_shapes(config: dict, e: Estimate) -> tuple[tuple[str, str], Shape, Shape]:
    teacher, student = e.job.split(" ", 1)[1].split(" -> ")
    return (teacher, student), model_shape(config, student)[0], model_shape(config, teacher)[0]


def largest_microbatch(config: dict, e: Estimate) -> int | None:
    """The largest train.max_tokens_per_microbatch (a multiple of 1024, at most a rank's share) that fits."""
    if e.kind != "train":
        return None
    pair, S, T = _pair_shapes(config, e)
    top = e.settings.rank_tokens - e.settings.rank_tokens % 1024
    return next((n for n in range(top, 0, -1024) if train_estimate(config, pair, S, T, microbatch=n).fits), None)


def fit_advice(config: dict, e: Estimate) -> str:
    """What would make a job fit: the largest micro-batch that does, or the GPUs FSDP needs."""
    if e.kind != "train":
        return ("set diagnose.max_tokens_per_microbatch / diagnose.logit_chunk lower, diagnose.gradient_checkpointing "
                "on, or resources.diagnose.gpu_mem_gb higher")
    best = largest_microbatch(config, e)
    if best:
        return f"fits with train.max_tokens_per_microbatch <= {best}"
    pair, S, T = _pair_shapes(config, e)
    for gpus in range(max(2, e.settings.gpus + 1), 65):
        if train_estimate(config, pair, S, T, gpus=gpus, sharding="fsdp").fits:
            return f"fits with train.sharding: fsdp and {gpus} GPUs (the pair's train.pairs gpu or resources.train.gpu)"
    return "does not fit at any micro-batch or FSDP width up to 64 GPUs"


def config_problems(config: dict) -> list[str]:
    """Validation check (workflow/rules/common.smk): every job over its resources' gpu_mem_gb, and why."""
    from opd.studies import sweep

    found, problems = estimates(config)
    if not any(config["resources"][kind].get("gpu_mem_gb") for kind in ("train", "diagnose")):
        problems = [p for p in problems if not p.endswith(NEEDS_SHAPE)]  # no check asked for: shapes not needed
    for pair in sweep.pairs(config["models"], config["train"]):
        if config["train"].get("sharding") == "fsdp" and pair_gpus(config, *pair) <= 1:
            problems.append(f"train.sharding: fsdp needs more than one GPU for pair {pair[0]} -> {pair[1]} "
                            f"(resources.train.gpu or its train.pairs gpu): one torchrun process per GPU to shard over")
    if config["train"].get("sharding") == "fsdp" and config["train"].get("async_rollouts"):
        problems.append("train.async_rollouts: 1 does not work with train.sharding: fsdp; use ddp or async_rollouts 0")
    for e in found:
        if not e.fits:
            problems.append(f"{e.job}: estimated peak {e.peak / GIB:.1f} GiB per GPU > resources.{e.kind}.gpu_mem_gb "
                            f"{e.cap_gib:g}; {fit_advice(config, e)} (python -m opd.studies.plan)")
    return problems


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def table(config: dict, found: list[Estimate]) -> str:
    """A Markdown table: one row per job, every term in GiB per GPU, the peak, the largest fitting budget."""
    head = ("| job | GPUs | sharding | tokens / micro-batch | logit chunk | checkpointing | student weights "
            "| gradients | AdamW | FSDP/DDP extra | teacher | vLLM | activations (no ckpt / ckpt) | logit chunk bytes | scoring "
            "| peak | cap | largest fitting micro-batch |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in found:
        st, s = e.settings, e.terms()
        extra = sum(v for k, v in s.items() if k.startswith(("FSDP", "DDP")))
        shape = model_shape(config, e.job.split()[-1])[0]
        acts = [activation_bytes(shape, st.tokens, st.compute_bytes, c) for c in (False, True)]
        update = "update" in e.phases  # rollout and scoring jobs keep no activations for backward
        best = largest_microbatch(config, e)
        rows.append(" | ".join([
            f"| {e.job}", str(st.gpus if e.kind == "train" else 1), st.sharding if e.kind == "train" else "-",
            str(st.tokens), str(st.chunk(shape.vocab_size)), ("on" if st.checkpointing else "off") if update else "-",
            _gib(s.get("student weights", 0)), _gib(s.get("gradients", 0)), _gib(s.get("AdamW state", 0)),
            _gib(extra), _gib(s.get("teacher", 0)), _gib(s.get("vLLM share", 0)),
            f"{_gib(acts[0])} / {_gib(acts[1])}" if update else "-",
            _gib(logit_bytes(shape, st.chunk(shape.vocab_size), st.compute_bytes)) if update else "-",
            _gib(e.phases["scoring"]) if "scoring" in e.phases else "-", f"**{_gib(e.peak)}**",
            "-" if e.cap_gib is None else f"{e.cap_gib:g}" + ("" if e.fits else " (does not fit)"),
            "-" if best is None else str(best)]) + " |")
    return "\n".join(rows)


def load_config(paths: list[Path]) -> dict:
    """The files merged as --configfile merges them, with every check but this planner's (opd.studies.checks)."""
    from opd.studies import checks

    return checks.validate(checks.load(paths))


def main(argv: list[str] | None = None) -> str:
    from opd.studies import cost  # the cost planner reads the shapes from opd.studies.shapes, not from here

    p = cli.ArgumentParser(description="Estimated peak GPU memory of every job, and with --gpu (or resources.gpu_type) "
                                       "every GPU job's time and GPU-hours; exit status 1 when a job does not fit or "
                                       "a model's shape contradicts its config.json.")
    p.add_argument("--configfile", type=Path, nargs="+", required=True,
                   help="study config file(s), later ones overriding earlier ones (as snakemake --configfile)")
    cost.add_args(p)
    args = p.parse_args(argv)
    config = load_config(args.configfile)
    found = estimates(config)[0]
    problems = config_problems(config)
    text = table(config, found) + ("\n\nDoes not fit:\n" + "\n".join(f"- {x}" for x in problems) if problems
                                   else "\n\nEvery job fits its gpu_mem_gb.")
    cost_text, cost_json = ("", None) if problems else cost.report(config, args)  # a misfit first: no cost then
    if args.json:
        memory = [{"job": e.job, "gpus": e.settings.gpus, "peak_gib": e.peak / GIB, "cap_gib": e.cap_gib,
                   "fits": e.fits, "terms_gib": {k: v / GIB for k, v in e.terms().items()}} for e in found]
        text = json.dumps({"memory": memory, "memory_problems": problems, "cost": cost_json}, indent=1)
    elif cost_text:
        text += "\n\n" + cost_text
    print(text)
    if problems:
        raise cli.InputError(f"{len(problems)} problem(s), listed above under 'Does not fit'")  # exit status 1
    return text


if __name__ == "__main__":
    cli.run(main)
