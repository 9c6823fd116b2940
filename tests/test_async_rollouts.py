"""--async-rollouts 1: rollouts one step ahead in a thread, from the stated snapshot; exact resume; DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from opd.engines import async_rollouts, checkpoint, teacher_worker, train
from opd.engines.rollout import _cut_at_eos, generate_hf
from opd.infra.cli import FlagError
from test_distributed import _free_port
from test_resume_faults import _crash_after_saving
from test_train import Killed, _final_state, _kill_when_complete, argv

ASYNC = ("--method", "ta_opd", "--ratio", "0.3", "--steps", "4", "--checkpoint-every", "1", "--seed", "7",
         "--warmup-steps", "3", "--async-rollouts", "1")


@pytest.fixture(autouse=True)
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_hf_sampling_draws_the_old_global_stream_with_its_own_generator(tiny_world, temperature, top_p):
    """generate_hf's tokens are those transformers' own sampling drew after torch.manual_seed(seed) (what
    generate_hf did before), and the global RNG is left as it was (a sampling thread shares it)."""
    from transformers import AutoModelForCausalLM

    tok, model = tiny_world["tokenizer"], AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]] * 2
    before = torch.get_rng_state()
    new = generate_hf(model, tok, prompts, 4, temperature, top_p, 20, seed=123, batch_size=4)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(123)
    expected = []
    for start in range(0, len(prompts), 4):
        chunk = prompts[start:start + 4]
        P = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in chunk])
        attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk])
        config = GenerationConfig(max_new_tokens=20, top_k=0, min_p=0.0, repetition_penalty=1.0, do_sample=True,
                                  temperature=temperature, top_p=top_p, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)[:, P:]
        expected += [t for row in out for t in row[:_cut_at_eos(row, tok.eos_token_id)].tolist()]
    assert new["tokens_N"].tolist() == expected and len(set(expected)) > 3


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("extra", [(), ("--recompute-rollout-logprobs", "--dtype", "bfloat16"),
                                   ("--teacher-placement", "worker")])
def test_step_t_plus_1_trains_on_rollouts_of_the_weights_at_the_start_of_step_t(tiny_world, tmp_path, extra):
    """Also with the recompute (on the snapshot, under the thread's own bf16 autocast) and a teacher worker."""
    tr = train.setup(train.parse_args(argv(tiny_world, tmp_path / "a", *ASYNC, *extra)))
    ref = train.setup(train.parse_args(argv(tiny_world, tmp_path / "ref", *ASYNC[:-2], *extra)))  # async 0
    weights, used = [_weights(tr.student)], []
    with teacher_worker.for_trainer(tr), async_rollouts.for_trainer(tr, train.sample, None):
        for t in (1, 2, 3):
            result = train.run_step(tr, t)
            used.append((result.rollouts, result.metrics["rollout_staleness"]))
            weights.append(_weights(tr.student))  # weights[t]: after t updates
    assert [s for _, s in used] == [0.0, 1.0, 1.0]
    # step t's rollouts: sample(t) from the weights after max(t - 2, 0) updates; not from those after t - 1
    for t, (rollouts, _) in zip((1, 2, 3), used):
        ref.student.load_state_dict(weights[max(t - 2, 0)])
        expected, _ = train.sample(ref, t)
        assert rollouts.ids == expected.ids
        for k, v in expected.tensors.items():
            assert torch.equal(rollouts.tensors[k], v), (t, k)
    ref.student.load_state_dict(weights[2])
    assert not torch.equal(train.sample(ref, 3)[0].tensors["s_logprob_N"], used[2][0].tensors["s_logprob_N"])


def test_a_resumed_async_run_replays_exactly(tiny_world, tmp_path, monkeypatch):
    train.main(argv(tiny_world, tmp_path / "A", *ASYNC, "--name", "A"))
    real = _crash_after_saving(monkeypatch, 2)
    with pytest.raises(Killed):
        train.main(argv(tiny_world, tmp_path / "B", *ASYNC, "--name", "B"))
    monkeypatch.setattr(train, "save_checkpoint", real)
    ckpt = checkpoint.load_latest_checkpoint(tmp_path / "B")
    assert ckpt["step"] == 2 and "pending_rollouts.rank0.safetensors" in ckpt["files"]  # size-checked at load
    assert not list((tmp_path / "B" / "checkpoints").glob(".pending*"))  # the staging directory moved in
    off = train.parse_args(argv(tiny_world, tmp_path / "B", *ASYNC[:-2], "--name", "B"))
    train.check_args(off)  # resolves the signal flags, as the run does
    assert checkpoint.changed_flags(off, ckpt) == ["async_rollouts"]  # it changes the math: not resume-exempt
    older = {**ckpt, "flags": {k: v for k, v in ckpt["flags"].items() if k != "async_rollouts"}}
    assert checkpoint.changed_flags(off, older) == []  # written before the flag existed: with its default, 0
    on = train.parse_args(argv(tiny_world, tmp_path / "B", *ASYNC, "--name", "B"))
    train.check_args(on)
    assert checkpoint.changed_flags(on, older) == ["async_rollouts"]
    train.main(argv(tiny_world, tmp_path / "B", *ASYNC, "--name", "B"))

    (metrics_a, weights_a), (metrics_b, weights_b) = _final_state(tmp_path / "A"), _final_state(tmp_path / "B")
    assert metrics_a == metrics_b and metrics_a["step"] == 4 and metrics_a["rollout_staleness"] == 1.0
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # and it is another run than async 0's
    train.main(argv(tiny_world, tmp_path / "C", *ASYNC[:-2], "--name", "C"))
    _, weights_c = _final_state(tmp_path / "C")
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


@pytest.mark.slow
def test_a_sigkilled_async_run_resumes_and_replays_exactly(tiny_world, tmp_path):
    common = (*ASYNC, "--max-new-tokens", "160")  # longer responses: slower steps after the kill
    train.main(argv(tiny_world, tmp_path / "A", *common, "--name", "killA"))
    cmd = [sys.executable, "-m", "opd.engines.train", *argv(tiny_world, tmp_path / "B", *common, "--name", "killB")]
    _kill_when_complete(cmd, tmp_path / "B" / "checkpoints" / "step_000002")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics_a, weights_a), (metrics_b, weights_b) = _final_state(tmp_path / "A"), _final_state(tmp_path / "B")
    assert metrics_a == metrics_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_unsupported_async_settings_are_refused_naming_the_key(tiny_world, tmp_path):
    with pytest.raises(FlagError, match=r"--async-rollouts: 2 .*train.async_rollouts"):
        train.setup(train.parse_args(argv(tiny_world, tmp_path, "--method", "full", "--async-rollouts", "2")))
    args = train.parse_args(argv(tiny_world, tmp_path, "--method", "full", "--async-rollouts", "1",
                                 "--sharding", "fsdp"))
    with pytest.raises(ValueError, match=r"--async-rollouts 1 \(train.async_rollouts\) does not work with "
                                         r"--sharding fsdp"):
        async_rollouts.check_args(args)


def _torchrun(world, out, *extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OPD_DEBUG_CHECKSUM_DIR=str(out.parent / f"{out.name}_checksums"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "opd.engines.train",
           *argv(world, out, "--method", "ta_opd", "--ratio", "0.3", "--steps", "3",
                 "--checkpoint-every", "1", "--async-rollouts", "1", "--name", "ddp_async", *extra)]
    return cmd, env


def test_torchrun_two_ranks_sample_ahead_and_stay_identical(tiny_world, tmp_path):
    """DDP: each rank samples its own share in its own thread (every checkpoint but the last stages both
    ranks' pending rollouts)."""
    out = tmp_path / "A"
    cmd, env = _torchrun(tiny_world, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / "A_checksums" / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1  # DDP kept the two replicas identical
    assert json.loads((out / "metrics.json").read_text())["rollout_staleness"] == 1.0
    assert load_file(str(out / "model" / "model.safetensors"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"]  # no staging directory left


@pytest.mark.slow
def test_a_sigkilled_torchrun_async_run_resumes_and_replays_exactly(tiny_world, tmp_path):
    slow = ("--max-new-tokens", "160")  # slower steps after the kill
    (a_cmd, env), (b_cmd, _) = (_torchrun(tiny_world, tmp_path / name, *slow) for name in ("A", "B"))
    proc = subprocess.run(a_cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _kill_when_complete(b_cmd, tmp_path / "B" / "checkpoints" / "step_000002", env=env)
    ckpt = checkpoint.load_latest_checkpoint(tmp_path / "B")
    assert {"pending_rollouts.rank0.safetensors", "pending_rollouts.rank1.safetensors"} <= set(ckpt["files"])
    proc = subprocess.run(b_cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics_a, weights_a), (metrics_b, weights_b) = _final_state(tmp_path / "A"), _final_state(tmp_path / "B")
    assert metrics_a == metrics_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_a_failure_in_the_sampling_thread_stops_the_run_with_its_error(tiny_world, tmp_path, monkeypatch):
    """E.g. the vLLM worker dying during a background generate: its error at the next wait, never a hang."""
    real = train.sample

    def failing(tr, t):
        if t == 3:  # sampled in the thread, during step 2
            raise RuntimeError("the vLLM worker is gone (code -9)")
        return real(tr, t)

    monkeypatch.setattr(train, "sample", failing)
    with pytest.raises(RuntimeError, match=r"the vLLM worker is gone \(code -9\)"):
        train.main(argv(tiny_world, tmp_path / "out", *ASYNC, "--checkpoint-every", "5"))
    assert not (tmp_path / "out" / "checkpoints").exists()  # it stopped at step 3, before any checkpoint


def test_async_with_fsdp_in_a_config_is_refused_at_validation(repo):
    import yaml

    from opd.infra.config import ConfigError, validate_config
    from opd.studies import plan

    with open(repo / "config" / "paper.yaml") as fh:
        raw = yaml.safe_load(fh)
    assert raw["train"]["sharding"] == "fsdp"
    validate_config(dict(raw), checks=[plan.config_problems])  # as it is: fine
    raw["train"]["async_rollouts"] = 1
    with pytest.raises(ConfigError, match=r"train.async_rollouts: 1 does not work with train.sharding: fsdp"):
        validate_config(raw, checks=[plan.config_problems])
