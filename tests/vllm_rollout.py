"""Run inside the vLLM environment (.venv-vllm): greedy rollouts with opd.rollout.generate_vllm.

    python tests/vllm_rollout.py MODEL_DIR PROMPTS_JSON K MAX_NEW_TOKENS OUT.safetensors [TEMPERATURE]
"""

import json
import sys
from pathlib import Path


def main() -> None:
    from safetensors.torch import save_file

    from opd.engines.rollout import generate_vllm

    model_dir, prompts_json, k, max_new, out = sys.argv[1:6]
    temperature = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    prompts = json.loads(Path(prompts_json).read_text())
    tensors = generate_vllm(Path(model_dir), prompts, int(k), temperature, 1.0, int(max_new), seed=0, dtype="float32",
                            memory_fraction=0.1)  # CPU build: a share of host RAM for the KV cache
    save_file({n: t.contiguous() for n, t in tensors.items()}, out)


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main()
