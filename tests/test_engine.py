"""The vLLM rollout engine's plumbing that needs no vLLM: seeds, the weights file, the protocol, cleanup.

The engine itself (weights pushed into a live vLLM, training with it) is tested in tests/test_vllm.py.
"""

import io
import sys

import pytest
import torch
from safetensors.torch import load_file

from opd.engines import vllm_engine as engine
from opd.engines import vllm_worker


def test_request_seeds_are_a_pure_function_of_step_seed_and_index():
    a, b = vllm_worker.request_seeds(17, 6), vllm_worker.request_seeds(18, 6)
    assert a == vllm_worker.request_seeds(17, 6) and len(set(a)) == 6  # replayable, one stream per request
    assert not set(a) & set(b)  # the next step does not reuse this step's streams (seed + j would)
    assert all(0 <= s < 2**63 for s in a + b)  # fits the int64 generator seed


def test_weights_file_holds_each_tensor_once_and_is_renamed_into_place(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"]))
    path = engine.write_weights(model, tmp_path / "w", torch.bfloat16)
    saved = load_file(str(path))
    assert path.name == "model.safetensors" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert "lm_head.weight" not in saved  # tied to the embedding: vLLM ties it again
    assert saved.keys() == load_file(str(tiny_world["student"] / "model.safetensors")).keys()
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    emb = model.get_input_embeddings().weight
    assert torch.equal(saved["model.embed_tokens.weight"], emb.detach().to(torch.bfloat16))


def test_worker_answers_one_line_per_command_and_keeps_serving_after_an_error():
    replies = []
    lines = io.StringIO('{"cmd": "nope"}\n\n{"cmd": "shutdown"}\n{"cmd": "never read"}\n')
    vllm_worker.serve(llm=None, lines=lines, reply=replies.append)
    assert [r["ok"] for r in replies] == [False, True]
    assert "unknown command 'nope'" in replies[0]["error"]


def test_worker_env_puts_our_package_first_and_shows_the_worker_only_its_gpu(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    env = engine.worker_env(torch.device("cuda", 1))
    src = str(engine.Path(engine.opd.__file__).resolve().parents[1])
    assert env["PYTHONPATH"].split(":") == [src, "/elsewhere"] and env["CUDA_VISIBLE_DEVICES"] == "6"
    assert engine.worker_env(torch.device("cpu"))["CUDA_VISIBLE_DEVICES"] == "4,6"


def test_an_engine_that_cannot_start_raises_and_leaves_no_process(tiny_world, tmp_path):
    """This environment has no vLLM: the worker reports the import error, and nothing is left behind."""
    if __import__("importlib.util").util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    with pytest.raises(RuntimeError, match="No module named 'vllm'"):
        engine.VllmEngine(sys.executable, tiny_world["student"], tmp_path / "eng", dtype="float32", max_model_len=64,
                          max_logprobs=4, memory_fraction=0.1, device=torch.device("cpu"))
    assert not (tmp_path / "eng").exists()


def test_training_with_an_engine_that_cannot_start_fails_and_cleans_up(tiny_world, tmp_path, monkeypatch):
    from opd.engines import train

    if __import__("importlib.util").util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the vLLM worker failed"):
        train.main(["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
                    "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(out), "--method", "full",
                    "--steps", "1", "--prompts-per-step", "2", "--study", "test_engine",
                    "--rollout-backend", "vllm", "--vllm-python", sys.executable])
    assert not (out / "rollout_weights").exists() and not (out / "metrics.json").exists()
