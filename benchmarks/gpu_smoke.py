"""GPU smoke test of the paper-scale engine: does one update, one scoring pass and two training steps fit?

    python benchmarks/gpu_smoke.py            # one H100/H200, under 8 minutes (not yet run on one)
    python benchmarks/gpu_smoke.py --tiny     # the same phases at a tiny shape on CPU (tests/test_gpu_smoke.py)

Random-weight models built on the spot (no network): a Qwen3-1.7B-shaped student and a Qwen3-4B-shaped
teacher with the vocabulary 151,936, a word-level tokenizer over that vocabulary, and miniature-world prompts.
Phases, each with its peak GPU memory beside the planner's estimate (opd.studies.plan):
- `update`: one `opd.engines.train.update_step` on 8 responses of 8,192 tokens (synthetic rollouts, every
  position supervised) at the paper's budget (train.max_tokens_per_microbatch, logit_chunk and
  gradient_checkpointing of config/paper.yaml, when opd.engines.train has those flags); tokens/s and MFU;
- `scoring`: `opd.engines.score.score_rollouts` of the same rollouts (teacher and exact student pass);
- `train`: two `opd.engines.train.run_step` steps with the hf backend in bf16 (256 new tokens) — the training
  loop without `main`, so without MLflow.
Beside each phase's time: the cost planner's estimate (opd.studies.cost_model, at the default efficiencies of
`resources.cost`, on the hardware-table GPU whose name the device's contains; H100 SXM on CPU) and the implied
efficiency, the planner's FLOPs (or, for the hf rollouts of `train`, bytes) over the measured seconds and the
GPU's peak: the figure that replaces `resources.cost.compute_efficiency` / `bandwidth_efficiency` once measured.
Prints one JSON line. Only torch, transformers and safetensors are needed: opd is imported inside functions,
and nothing here imports vLLM, lm-eval, snakemake, mlflow, ruptures or nltk (method `full` never runs the
release rule). A phase that runs out of memory is reported as such and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = {"student": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128, intermediate_size=6144),
         "teacher": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=9728)}
TINY = {"student": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, intermediate_size=64),
        "teacher": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, intermediate_size=96)}
PAPER = {"vocab": 151_936, "responses": 8, "response_tokens": 8192, "prompt_tokens": 256, "new_tokens": 256,
         "prompts_per_step": 8, "samples": 4, "budget": 16384, "chunk": 1024}
SMALL = {"vocab": 512, "responses": 2, "response_tokens": 48, "prompt_tokens": 8, "new_tokens": 8,
         "prompts_per_step": 2, "samples": 2, "budget": 64, "chunk": 16}
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16


def build_models(root: Path, sizes: dict, vocab: int, device: torch.device) -> dict[str, Path]:
    """Random Qwen3 models and a word-level tokenizer over the whole vocabulary, saved as HF directories."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1", unk_token="t2")
    dirs = {}
    for seed, (name, shape) in enumerate(sizes.items()):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=vocab, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, **shape)
        with torch.device(device):
            model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else None)
        dirs[name] = root / name
        model.save_pretrained(str(dirs[name]))
        tok.save_pretrained(str(dirs[name]))
        del model
    return dirs


def trainer(dirs: dict[str, Path], root: Path, dims: dict, device: str, dtype: str):
    """opd.engines.train's Trainer for method `full`, with the paper's memory settings where it has the flags."""
    from opd.engines import train
    from opd.infra.io import write_jsonl
    from opd.worlds.miniature import generator

    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, generator.generate("arith2", 2 * dims["prompts_per_step"], seed=0, split="prompts"))
    argv = ["--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]), "--prompts", str(prompts),
            "--out-dir", str(root / "run"), "--method", "full", "--world", "miniature", "--device", device,
            "--dtype", dtype, "--steps", "2", "--max-new-tokens", str(dims["new_tokens"]),
            "--prompts-per-step", str(dims["prompts_per_step"]), "--samples", str(dims["samples"]),
            "--batch-size", str(dims["prompts_per_step"] * dims["samples"]), "--lr", "1e-6"]
    budget = ["--max-tokens-per-microbatch", str(dims["budget"]), "--logit-chunk", str(dims["chunk"]),
              "--gradient-checkpointing"]
    try:
        args, budgeted = train.parse_args(argv + budget), True
    except SystemExit:  # this opd.engines.train has no such flags yet (issue 11A): run it as it is
        args, budgeted = train.parse_args(argv), False
    return train.setup(args), budgeted


def synthetic_rollouts(dims: dict, vocab: int):
    """`responses` random responses of `response_tokens` tokens after random prompts (opd.engines.rollout)."""
    from opd.engines.rollout import Rollouts, _pack

    g = torch.Generator().manual_seed(0)
    B, R, P, K = dims["responses"], dims["response_tokens"], dims["prompt_tokens"], 16
    prompts = [torch.randint(3, vocab, (P,), generator=g).tolist() for _ in range(B)]
    responses = [torch.randint(3, vocab, (R,), generator=g).tolist() for _ in range(B)]
    lp = [-torch.rand(R, generator=g) * 5 for _ in range(B)]
    ids = [torch.randint(3, vocab, (R, K), generator=g) for _ in range(B)]
    topk = [-torch.rand(R, K, generator=g).sort(-1).values * 5 for _ in range(B)]
    return Rollouts([f"s{b}" for b in range(B)], _pack(prompts, responses, lp, ids, topk))


def measured(device: torch.device, fn):
    """(seconds, peak bytes on the device or None on CPU, error) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        fn()
        error = None
    except torch.cuda.OutOfMemoryError as err:  # report it; the next phase still runs
        error = f"out of memory: {str(err).splitlines()[0]}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device), error
    return time.perf_counter() - start, None, error


def planned(dims: dict, sizes: dict, vocab: int, bf16: bool) -> dict[str, float]:
    """The planner's estimate of each phase on one GPU (GiB): static terms + the phase's own."""
    from opd.studies import plan

    S, T = (plan.Shape(vocab_size=vocab, tie_word_embeddings=True, **sizes[n]) for n in ("student", "teacher"))
    b = 2 if bf16 else 4
    tokens = dims["responses"] * (dims["prompt_tokens"] + dims["response_tokens"])
    st = plan.Settings(gpus=1, sharding="ddp", compute_bytes=b, rank_tokens=tokens, microbatch=dims["budget"],
                       logit_chunk=dims["chunk"], checkpointing=True, vllm_fraction=0.0,
                       kv_sequences=dims["prompts_per_step"] * dims["samples"],
                       seq_tokens=dims["prompt_tokens"] + dims["new_tokens"])
    static = sum(plan.student_bytes(S, st).values()) + b * T.params()
    update = plan.update_bytes(S, st)
    scoring = plan.scoring_bytes([T, S], st)
    gib = lambda x: float(f"{x / plan.GIB:.3g}")  # noqa: E731  (3 significant digits: --tiny's are small)
    return {"update": gib(static + update), "scoring": gib(static + scoring),
            "train": gib(static + max(update, scoring, plan.kv_cache_bytes(S, st)))}


def mfu(sizes: dict, vocab: int, dims: dict, seconds: float) -> float:
    """Model FLOPs of the update (6·P·T plus causal attention, no recompute) over the GPU's bf16 peak."""
    from opd.studies import plan

    S = plan.Shape(vocab_size=vocab, tie_word_embeddings=True, **sizes["student"])
    seq = dims["prompt_tokens"] + dims["response_tokens"]
    tokens = dims["responses"] * seq
    flops = 6 * S.params() * tokens + 6 * S.num_hidden_layers * dims["responses"] * seq * seq * S.q
    return flops / seconds / PEAK_BF16_FLOPS


def reference_gpu(device_name: str):
    """The hardware table's GPU whose name the device's contains (H100 SXM when none does, e.g. on CPU)."""
    from opd.infra import hardware

    name = device_name.lower()
    known = [g for key, g in sorted(hardware.GPUS.items(), key=lambda kv: -len(kv[0]))
             if key.split("_")[0] in name and ("pcie" in name) == ("pcie" in key)]
    return known[0] if known else hardware.gpu("h100")


def estimated(dims: dict, sizes: dict, vocab: int, checkpointing: bool) -> dict[str, tuple[float, str]]:
    """Each phase's work by the cost model: (FLOPs or bytes, which): scoring = teacher + exact student forward,
    update = forward and backward, train = two steps, each decoding (bytes) the hf rollouts of its batch."""
    from opd.studies import cost_model as cm
    from opd.studies.shapes import Shape

    S, T = (Shape(vocab_size=vocab, tie_word_embeddings=True, **sizes[n]) for n in ("student", "teacher"))
    B, R = dims["responses"], dims["response_tokens"]
    L = dims["prompt_tokens"] + R
    seqs = dims["prompts_per_step"] * dims["samples"]
    decode = cm.decode(S, seqs, 16, dims["new_tokens"], float("inf"), 2 * S.params(), max_seqs=64)
    return {"scoring": (cm.forward_flops(T, B, L, R) + cm.forward_flops(S, B, L, R), "flops"),
            "update": (cm.update_flops(S, B, L, R, checkpointing), "flops"),
            "train": (2 * decode.bytes, "bytes")}


def calibration(result: dict, work: dict, gpu, on_gpu: bool) -> None:
    """Add to each measured phase the planner's seconds (default efficiencies) and the implied efficiency."""
    from opd.infra.config import load_schema

    defaults = load_schema()["properties"]["resources"]["properties"]["cost"]["properties"]
    peak = {"flops": (gpu.bf16_flops, defaults["compute_efficiency"]["default"]),
            "bytes": (gpu.bandwidth, defaults["bandwidth_efficiency"]["default"])}
    for name, (amount, kind) in work.items():
        if name not in result or "error" in result[name]:
            continue
        rate, default = peak[kind]
        result[name]["planned_seconds"] = float(f"{amount / (rate * default):.3g}")  # 3 digits: --tiny's are tiny
        result[name]["planned_" + kind] = amount
        result[name]["implied_efficiency"] = round(amount / (result[name]["seconds"] * rate), 4) if on_gpu else None


def run(tiny: bool) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    sizes, dims = (TINY, SMALL) if tiny else (QWEN3, PAPER)
    device = torch.device("cpu" if tiny else "cuda")
    dtype = "float32" if tiny else "bfloat16"
    vocab = dims["vocab"]
    out: dict = {"device": "cpu" if tiny else torch.cuda.get_device_name(device), "tiny": tiny}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build_models(root, sizes, vocab, device)
        tr, out["paper_budget_flags"] = trainer(dirs, root, dims, device.type, dtype)
        out.update(phases(tr, dims, sizes, vocab, device))
    out["planned_peak_gib"] = planned(dims, sizes, vocab, bf16=not tiny)
    gpu = reference_gpu(out["device"])
    out["reference_gpu"] = gpu.name
    calibration(out, estimated(dims, sizes, vocab, out["paper_budget_flags"]), gpu, on_gpu=not tiny)
    return out


def phases(tr, dims: dict, sizes: dict, vocab: int, device: torch.device) -> dict:
    from opd.engines import train
    from opd.engines.score import score_rollouts

    rollouts = synthetic_rollouts(dims, vocab)
    B, R = dims["responses"], dims["response_tokens"]
    mask_BT = torch.ones(B, R, dtype=torch.bool)
    scores = {}

    def score():
        with train.accel.autocast(tr.device, tr.args.dtype):
            scores.update(score_rollouts(tr.teacher, rollouts, 16, B, student=tr.student))

    def update():
        train.update_step(tr, rollouts, scores, mask_BT, step=1)

    def steps():
        for t in (1, 2):
            train.run_step(tr, t)

    result, gib = {}, lambda x: None if x is None else round(x / 2 ** 30, 2)  # noqa: E731
    for name, fn in (("scoring", score), ("update", update), ("train", steps)):
        if name == "update" and not scores:
            result["update"] = {"error": "skipped: scoring failed"}
            continue
        seconds, peak, error = measured(device, fn)
        result[name] = {"seconds": round(seconds, 2), "peak_gib": gib(peak), **({"error": error} if error else {})}
    tokens = B * (dims["prompt_tokens"] + R)
    if "error" not in result["update"]:
        result["update"]["tokens_per_second"] = round(tokens / result["update"]["seconds"])
        result["update"]["mfu"] = None if device.type == "cpu" else round(mfu(sizes, vocab, dims,
                                                                              result["update"]["seconds"]), 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Peak GPU memory of the paper-scale update, scoring and two steps.")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py needs a CUDA GPU (or --tiny for the CPU check of the script)")
    out = run(args.tiny)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
