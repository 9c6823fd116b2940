"""The vLLM rollout engine's plumbing that needs no vLLM: seeds, the weights file, the protocol, cleanup.

The engine itself (weights pushed into a live vLLM, training with it) is tested in tests/test_vllm.py.
"""

import io
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from opd.engines import vllm_engine as engine
from opd.engines import vllm_worker, worker_proc


def test_one_sampling_seed_per_generate_command_a_pure_function_of_the_step_seed():
    seeds = [vllm_worker.batch_seed(s) for s in range(1000)]
    assert seeds[17] == vllm_worker.batch_seed(17) and len(set(seeds)) == 1000  # replayable, one stream per step
    assert seeds[18] != seeds[17] + 1  # neighbouring steps (and ranks) get unrelated streams
    assert all(0 <= s < 2**63 for s in seeds)  # fits the int64 generator seed


def test_a_weights_file_of_another_step_or_a_partial_one_is_refused(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"]))
    path = engine.write_weights(model, tmp_path / "w", torch.float32, version=7)
    vllm_worker.check_version(str(path.parent), 7)  # the one written for step 7
    vllm_worker.check_version(str(path.parent), None)  # no version asked: nothing checked
    with pytest.raises(RuntimeError, match="is for step 7, not 8 .*refusing to sample from old weights"):
        vllm_worker.check_version(str(path.parent), 8)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with pytest.raises(RuntimeError, match="missing or unreadable"):
        vllm_worker.check_version(str(path.parent), 7)
    with pytest.raises(RuntimeError, match="missing or unreadable"):
        vllm_worker.check_version(str(tmp_path / "nowhere"), 7)


def test_shared_weights_live_in_shared_memory_one_directory_per_run(tmp_path):
    a, b = engine.shm_weights_dir(tmp_path / "run_a"), engine.shm_weights_dir(tmp_path / "run_b")
    assert a.parent == engine.SHM_ROOT and a != b and a == engine.shm_weights_dir(tmp_path / "run_a")
    host = socket.gethostname()
    assert a.name.endswith(f"@{host}:{os.getpid()}")  # its owner: this process (the node's local rank 0)
    assert engine.shm_weights_dir(tmp_path / "run_a", 4242).name == a.name.replace(f":{os.getpid()}", ":4242")


def test_copies_of_dead_owners_are_removed_and_live_ones_kept(tmp_path):
    """What a SIGKILLed job leaves (its pid is dead) goes at the next start; a live process's copy stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that was ours and is now no process
    host = socket.gethostname()
    names = {"dead_weights": f"opd-weights-me-abc{engine.owner_tag(dead.pid)}",
             "dead_teacher": f"opd-teacher{engine.owner_tag(dead.pid)}-x1y2",
             "live_weights": f"opd-weights-me-def{engine.owner_tag()}",
             "other_host": f"opd-weights-me-abc@not-{host}:{dead.pid}",
             "unowned": "opd-weights-me-0123456789ab"}  # the old naming: no owner, never touched
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.warns(UserWarning, match="removed 2 shared-memory copies left by dead jobs"):
        removed = engine.remove_stale_copies(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["dead_teacher"], names["dead_weights"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("live_weights", "other_host", "unowned"))


def test_sleep_mode_on_a_cpu_run_is_refused_before_the_engine_starts():
    from types import SimpleNamespace

    args = SimpleNamespace(rollout_backend="vllm", vllm_sleep=True, device="cpu")
    with pytest.raises(ValueError, match=r"--vllm-sleep \(train.vllm_sleep\) needs CUDA.*device is cpu"):
        engine.check_args(args)
    with pytest.raises(ValueError, match="device is cpu"):
        engine.check_args(SimpleNamespace(**{**vars(args), "device": "auto"}), torch.device("cpu"))
    engine.check_args(SimpleNamespace(**{**vars(args), "vllm_sleep": False}))
    engine.check_args(SimpleNamespace(**{**vars(args), "device": "cuda"}), torch.device("cuda", 0))
    assert engine.enforce_eager("auto", torch.device("cpu")) and not engine.enforce_eager("auto", torch.device("cuda"))
    assert engine.enforce_eager(True, torch.device("cuda")) and not engine.enforce_eager(False, torch.device("cpu"))
    assert engine._tristate("True") is True and engine._tristate("false") is False and engine._tristate("AUTO") == "auto"


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
    worker_proc.serve({}, lines=lines, reply=replies.append)
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


def _fake_engine(tmp_path, writer: bool, calls: list, sleep: bool = False, ids_only: bool = False):
    """A VllmEngine whose worker is a recorder: the trainer-side logic without vLLM."""
    from safetensors.torch import save_file

    from opd.engines.distributed import Context

    def call(**cmd):
        calls.append((writer, cmd["cmd"], cmd.get("version", cmd.get("K"))))
        if cmd["cmd"] == "generate":
            save_file({"tokens_N": torch.tensor([1, 2])}, cmd["out"])
        return {"ok": True, "seconds": 0.0}

    eng = object.__new__(engine.VllmEngine)
    eng.weights_dir, eng.rollouts_file, eng.dtype = tmp_path / "shm", tmp_path / f"r{int(writer)}.safetensors", "bfloat16"
    eng.writer, eng.shared, eng.ctx, eng.sleep_mode, eng.asleep = writer, True, Context(), sleep, False
    eng.ids_only, eng._call = ids_only, call
    return eng


def test_one_copy_per_node_local_rank_0_writes_every_engine_loads_it(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    model, calls = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])), []
    rank0, rank1 = _fake_engine(tmp_path, True, calls), _fake_engine(tmp_path, False, calls)
    a, b = rank0.push_weights(model, version=5), rank1.push_weights(model, version=5)
    file = tmp_path / "shm" / "model.safetensors"
    assert a["push_bytes"] == file.stat().st_size > 0 and b["push_bytes"] == 0  # bytes per node: one copy
    assert sorted(p.name for p in file.parent.iterdir()) == ["model.safetensors"]
    assert calls == [(True, "load_weights", 5), (False, "load_weights", 5)]
    vllm_worker.check_version(str(file.parent), 5)


def test_sleep_mode_sleeps_after_rollouts_and_wakes_before_the_next_push(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    model, calls = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])), []
    eng = _fake_engine(tmp_path, True, calls, sleep=True)
    eng.push_weights(model, version=1)
    eng.generate([[1]], 0, 1.0, 1.0, 2, seed=0)
    eng.push_weights(model, version=2)
    eng.generate([[1]], 0, 1.0, 1.0, 2, seed=0)
    assert [c for _, c, _ in calls] == ["load_weights", "generate", "sleep", "wake_up", "load_weights", "generate",
                                        "sleep"]


def test_an_engine_for_a_recomputing_trainer_asks_vllm_for_no_topk(tmp_path):
    calls = []
    _fake_engine(tmp_path, True, calls, ids_only=True).generate([[1]], 16, 1.0, 1.0, 2, seed=0)
    _fake_engine(tmp_path, True, calls).generate([[1]], 16, 1.0, 1.0, 2, seed=0)
    assert calls == [(True, "generate", 0), (True, "generate", 16)]


RANKS_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
from opd.engines import distributed, vllm_engine as engine, vllm_worker

torch.distributed.init_process_group("gloo")
ctx = distributed.Context(torch.distributed.get_rank(), torch.distributed.get_world_size())


class Model:  # all write_weights asks of a model
    def state_dict(self):
        return {"w": torch.ones(128, 128)}


eng = object.__new__(engine.VllmEngine)
eng.weights_dir, eng.dtype, eng.writer, eng.shared = Path(sys.argv[1]), "float32", engine.local_rank() == 0, True
eng.ctx, eng.sleep_mode, eng.asleep, eng.ids_only = ctx, False, False, False
eng._call = lambda **cmd: vllm_worker.check_version(cmd["path"], cmd["version"]) or {"seconds": 0.0}
pushed = []
for version in (1, 2):
    if ctx.rank == 0:
        time.sleep(2)  # a reader that did not wait for the writer would find no file, or the old one
    pushed.append(eng.push_weights(Model(), version=version)["push_bytes"])
    torch.distributed.barrier()  # stands for the update's all-reduce between two pushes
sys.stdout.write(json.dumps({"rank": ctx.rank, "bytes": pushed}) + "\\n")  # one write: the ranks share the pipe
sys.stdout.flush()
"""


def test_two_ranks_on_one_node_one_writes_both_read_the_same_step(tmp_path, repo):
    import json
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "ranks.py").write_text(RANKS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(tmp_path / "ranks.py"), str(tmp_path / "shm")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    size = (tmp_path / "shm" / "model.safetensors").stat().st_size
    assert [r["bytes"] for r in rows] == [[size, size], [0, 0]]  # one copy per node and step, read by both
