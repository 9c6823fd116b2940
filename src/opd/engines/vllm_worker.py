"""A persistent vLLM engine in its own process, for rollouts inside the training loop (`opd.engines.vllm_engine`).

Runs under the vLLM environment's python (vLLM cannot share an environment with the CPU torch stack):

    python -m opd.engines.vllm_worker --model STUDENT_DIR --dtype float32 --max-model-len 512 --max-logprobs 16

It reads one JSON command per line on stdin and answers one JSON line per command:

    {"cmd": "load_weights", "path": DIR}     reload every weight in place from DIR/*.safetensors
    {"cmd": "generate", "prompts": [[ids]], "K", "temperature", "top_p", "max_new_tokens", "seed", "out"}
                                             rollouts of the current weights -> `out` (.safetensors, the
                                             tensors of `opd.rollout.generate_hf`)
    {"cmd": "shutdown"}                      (or end of stdin: the trainer is gone) engine down, exit

Answers are {"ok": true, ...} or {"ok": false, "error": traceback}; the first line, once the engine is
up, is {"ok": true, "ready": true, "vllm": version}. The protocol owns the original stdout: everything
else printed to stdout (vLLM's logs, its engine-core process) is sent to stderr, which the trainer
passes through to its own log.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
import traceback

from opd.infra.io import atomic_path


def request_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per request, a pure function of (step seed, request index).

    Each request gets its own generator: copies of one prompt then sample independently (one shared
    seed would give identical copies), and the samples do not depend on how vLLM batches. Hashing keeps
    the streams of neighbouring steps unrelated (seed + j would reuse step t's streams at step t+1).
    """
    return [int.from_bytes(hashlib.sha256(f"{seed}:{j}".encode()).digest()[:8], "little") >> 1 for j in range(n)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Persistent vLLM rollout engine driven by JSON lines on stdin.")
    p.add_argument("--model", required=True, help="Hugging Face model directory the engine starts from")
    p.add_argument("--dtype", default="auto", help="vLLM dtype (float32, bfloat16, auto)")
    p.add_argument("--max-model-len", type=int, required=True, help="longest prompt + response, in tokens")
    p.add_argument("--max-logprobs", type=int, default=20, help="largest K a generate command may ask for")
    p.add_argument("--memory-fraction", type=float, default=0.3,
                   help="vLLM gpu_memory_utilization (the CPU build: share of host RAM for the KV cache)")
    p.add_argument("--seed", type=int, default=0, help="engine seed (each request also carries its own)")
    return p.parse_args(argv)


def start_engine(args: argparse.Namespace):
    from vllm import LLM

    # enforce_eager: no CUDA-graph capture, whose start-up cost and memory a rollout engine that shares
    # its GPU with the trainer cannot afford to pay for every batch shape.
    return LLM(model=args.model, dtype=args.dtype, seed=args.seed, enforce_eager=True,
               max_logprobs=max(args.max_logprobs, 20), gpu_memory_utilization=args.memory_fraction,
               max_model_len=args.max_model_len, worker_extension_cls=f"{__name__}.WeightReload")


class WeightReload:
    """Mixed into vLLM's worker class (`worker_extension_cls`): runs in the process that holds the model."""

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


def load_weights(llm, path: str) -> dict:
    """In-place reload of every weight into the running engine (no restart)."""
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
    params = [SamplingParams(temperature=temperature, top_p=cmd["top_p"] if temperature > 0 else 1.0,
                             max_tokens=cmd["max_new_tokens"], logprobs=K, seed=s, detokenize=False)
              for s in request_seeds(cmd["seed"], len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tensors = vllm_outputs_to_tensors(prompts, outs, K)
    with atomic_path(cmd["out"]) as tmp:  # the trainer never reads a half-written file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return {"tokens": int(tensors["offsets_B1"][-1])}


def serve(llm, lines, reply) -> None:
    """Answer commands until `shutdown` or the end of input."""
    for line in lines:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "shutdown":
                reply({"ok": True})
                return
            if cmd["cmd"] == "load_weights":
                reply({"ok": True, **load_weights(llm, cmd["path"])})
            elif cmd["cmd"] == "generate":
                reply({"ok": True, **generate(llm, cmd)})
            else:
                raise ValueError(f"unknown command {cmd['cmd']!r}")
        except Exception:  # the trainer decides what to do: it raises with this traceback
            reply({"ok": False, "error": traceback.format_exc()})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # fd 1 (and every child's stdout) now goes to stderr: the protocol stream stays clean
    # SIGTERM from the trainer: leave through `finally`, so vLLM shuts its engine-core process down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    llm = None
    try:
        llm = start_engine(args)
        import vllm

        reply({"ok": True, "ready": True, "vllm": vllm.__version__})
        serve(llm, sys.stdin, reply)
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        raise
    finally:
        if llm is not None:  # the engine-core process goes down with us, not as an orphan
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":  # vLLM spawns its engine-core process: the guard is required
    main()
