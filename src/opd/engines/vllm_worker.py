"""A persistent vLLM engine in its own process, for rollouts inside the training loop (`opd.engines.vllm_engine`).

Runs under the vLLM environment's python (vLLM cannot share an environment with the CPU torch stack):

    python -m opd.engines.vllm_worker --model STUDENT_DIR --dtype float32 --max-model-len 512 --max-logprobs 16

It speaks the JSON-lines protocol of `opd.engines.worker_proc`:

    {"cmd": "load_weights", "path": DIR, "version": V}
                                             reload every weight in place from DIR/*.safetensors, after
                                             checking that the file is the one written for step V
    {"cmd": "generate", "prompts": [[ids]], "K", "temperature", "top_p", "max_new_tokens", "seed", "out"}
                                             rollouts of the current weights -> `out` (.safetensors, the
                                             tensors of `opd.rollout.generate_hf`; K = 0: no top-K)
    {"cmd": "sleep", "level": 1} / {"cmd": "wake_up"}
                                             vLLM sleep mode (CUDA builds, engine started with --sleep-mode)
    {"cmd": "shutdown"}                      (or end of stdin: the trainer is gone) engine down, exit

The first line, once the engine is up, is {"ok": true, "ready": true, "vllm": version}.

Sampling seeds: ONE per generate command (the trainer's step seed of its rank). It seeds the global
torch generator of the process that runs the model just before the batch, and the requests carry no
seed of their own, so vLLM samples the whole batch from one stream (its fast path; a per-request seed
makes it draw per request) and copies of one prompt still differ. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the batch is scheduled the same way every time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

from opd.engines import worker_proc
from opd.infra.io import atomic_path

VERSION_KEY = "opd_weights_version"  # safetensors metadata of a pushed weights file: the step it is for


def batch_seed(seed: int) -> int:
    """The generator seed of one generate command: a pure function of the step seed, in [0, 2**63).

    Hashing keeps the streams of neighbouring steps unrelated (seed t+1 would otherwise be a seed a
    neighbouring run or rank used).
    """
    return int.from_bytes(hashlib.sha256(f"opd-rollouts:{seed}".encode()).digest()[:8], "little") >> 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Persistent vLLM rollout engine driven by JSON lines on stdin.")
    p.add_argument("--model", required=True, help="Hugging Face model directory the engine starts from")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (float32, bfloat16, auto)")
    p.add_argument("--max-model-len", type=int, required=True, help="longest prompt + response, in tokens")
    p.add_argument("--max-logprobs", type=int, default=20, help="largest K a generate command may ask for")
    p.add_argument("--memory-fraction", type=float, default=0.3,
                   help="vLLM gpu_memory_utilization (the CPU build: share of host RAM for the KV cache)")
    p.add_argument("--seed", type=int, default=0, help="engine seed (each generate command reseeds it)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (the CPU build; on GPUs, graphs are captured unless this is set)")
    p.add_argument("--sleep-mode", action="store_true", help="enable vLLM sleep mode (CUDA builds only)")
    return p.parse_args(argv)


def start_engine(args: argparse.Namespace):
    # The engine core in this process: one generate then schedules its whole batch before the first step
    # (a separate engine-core process may start on the first requests while the rest are still arriving),
    # so one seed per batch replays exactly. On one device the model runs in this process too.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    # CUDA graphs (enforce_eager=False) pay a capture at start-up for much faster decoding; with sleep
    # mode the engine hands its memory back during the update, so they are affordable on GPUs.
    extra = {"enable_sleep_mode": True} if args.sleep_mode else {}
    return LLM(model=args.model, dtype=args.dtype, seed=args.seed, enforce_eager=args.enforce_eager,
               max_logprobs=max(args.max_logprobs, 20), gpu_memory_utilization=args.memory_fraction,
               max_model_len=args.max_model_len, worker_extension_cls=f"{__name__}.WeightReload", **extra)


class WeightReload:
    """Mixed into vLLM's worker class (`worker_extension_cls`): runs in the process that holds the model."""

    def opd_seed(self, seed: int) -> None:
        """Seed the generator that vLLM's sampler draws unseeded requests from (this process's global one)."""
        import torch

        torch.manual_seed(seed)  # seeds CUDA's default generators too

    def opd_reload_weights(self, path: str) -> None:
        """Every weight from path/*.safetensors, in place (vLLM's layerwise `reload_weights`).

        A tied LM head has no weight of its own in the file, so the reload never re-processes it. On
        the CPU build that processing packs a private copy of the weight for the LM head's GEMM: it
        would keep computing logits with the start weights (found by tests/test_vllm.py). Re-running
        it here costs one pack of the embedding; on GPUs the method does nothing.
        """
        from vllm.config import set_current_vllm_config

        self.reload_weights(weights_path=path)
        model = self.model_runner.get_model()
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and head.weight is embed.weight:
            with set_current_vllm_config(self.vllm_config):
                head.quant_method.process_weights_after_loading(head)


def check_version(path: str, version) -> None:
    """The weights file under `path` is the complete one written for `version`, or one clear error."""
    from pathlib import Path

    from safetensors import safe_open

    if version is None:
        return
    file = Path(path) / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as fh:
            found = (fh.metadata() or {}).get(VERSION_KEY)
    except Exception as e:  # missing, truncated or not safetensors
        raise RuntimeError(f"weights file {file} is missing or unreadable ({e}): refusing to sample "
                           f"from old weights") from None
    if found != str(version):
        raise RuntimeError(f"weights file {file} is for step {found}, not {version} (stale or partial push): "
                           f"refusing to sample from old weights")


def load_weights(llm, path: str, version=None) -> dict:
    """In-place reload of every weight into the running engine (no restart)."""
    check_version(path, version)
    start = time.perf_counter()
    llm.collective_rpc("opd_reload_weights", args=(path,))
    # Cached prompt KV was computed by the old weights: drop it, or new rollouts would reuse it.
    llm.reset_prefix_cache()
    return {"seconds": time.perf_counter() - start}


def generate(llm, cmd: dict) -> dict:
    from safetensors.torch import save_file
    from vllm import SamplingParams

    from opd.engines.rollout import vllm_outputs_to_tensors

    prompts, K, temperature = cmd["prompts"], cmd["K"], cmd["temperature"]
    params = SamplingParams(temperature=temperature, top_p=cmd["top_p"] if temperature > 0 else 1.0,
                            max_tokens=cmd["max_new_tokens"], logprobs=K, detokenize=False)
    llm.collective_rpc("opd_seed", args=(batch_seed(cmd["seed"]),))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tensors = vllm_outputs_to_tensors(prompts, outs, K)
    with atomic_path(cmd["out"]) as tmp:  # the trainer never reads a half-written file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return {"tokens": int(tensors["offsets_B1"][-1])}


def handlers(llm) -> dict:
    """The commands of this worker, on a running engine."""
    def sleep(cmd: dict) -> dict:
        llm.sleep(level=int(cmd.get("level", 1)))
        return {}

    def wake_up(cmd: dict) -> dict:
        llm.wake_up(tags=cmd.get("tags"))
        return {}

    return {"load_weights": lambda cmd: load_weights(llm, cmd["path"], cmd.get("version")),
            "generate": lambda cmd: generate(llm, cmd), "sleep": sleep, "wake_up": wake_up}


def start(args: argparse.Namespace):
    """(handlers, ready info, cleanup): the engine-core process goes down with us, not as an orphan."""
    import vllm

    llm = start_engine(args)
    return handlers(llm), {"vllm": vllm.__version__}, lambda: llm.llm_engine.engine_core.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    worker_proc.run(lambda: start(args))


if __name__ == "__main__":  # vLLM spawns its engine-core process: the guard is required
    main()
