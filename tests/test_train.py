import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from opd.engines import train, update
from opd.engines.rollout import Rollouts, token_char_offsets
from opd.engines import checkpoint
from opd.engines.signals import BatchSignals
from opd.math.release import ReleaseRule
from opd.math.variant import OFFICIAL

SMALL = ["--top-k", "4", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "12",
         "--threads", "1", "--lr", "1e-3", "--study", "test_train"]


def argv(world, out, *extra) -> list[str]:
    return ["--student", str(world["student"]), "--teacher", str(world["teacher"]),
            "--world", "miniature", "--prompts", str(world["prompts"]), "--out-dir", str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module: creating its schema costs seconds, so pay it once."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def trainer(tiny_world, tmp_path_factory):
    args = train.parse_args(argv(tiny_world, tmp_path_factory.mktemp("unused"), "--method", "full", "--steps", "4"))
    return train.setup(args)


def with_flags(tr: train.Trainer, **flags) -> train.Trainer:
    tr.args = argparse.Namespace(**{**vars(tr.args), **flags})
    return tr


@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_runs_a_step_inside_the_valid_positions(trainer, method):
    out = train.run_step(with_flags(trainer, method=method, ratio=0.3, aggregation="token_mean"), t=1)
    valid, mask = out.signals.valid_BT, out.mask_BT
    assert mask.dtype == torch.bool and mask.shape == valid.shape
    assert not bool((mask & ~valid).any()) and bool(mask.any())
    if method == "full":
        assert torch.equal(mask, valid)
    m = out.metrics
    assert all(math.isfinite(v) for v in m.values())
    assert m["frac_supervised"] == pytest.approx(float(mask.sum() / valid.sum()))
    # First update of a fresh batch: new = old log-probs, so the loss is the supervised reverse KL.
    assert m["loss"] == pytest.approx(m["reverse_kl_supervised"], abs=1e-3)
    for b, idx in enumerate(out.release_B):
        if idx is not None:
            assert not bool(mask[b, idx:].any())


def _planted_release_batch(tok):
    """Two rollouts of a multi-sentence response whose teacher margin collapses at "That was easy."."""
    text = " 3 plus 4 is 7. 7 plus 1 is 8. 8 minus 2 is 6. The answer is 6. That was easy. I checked each step."
    response = tok(text)["input_ids"]
    prompt = tok("Question: Start with 3.\nAnswer:")["input_ids"]
    responses = [response, response[:-2]]
    flat = lambda seqs: torch.tensor([x for s in seqs for x in s], dtype=torch.int32)  # noqa: E731
    offsets = lambda seqs: torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)  # noqa: E731
    rollouts = Rollouts(["a", "b"], {"offsets_B1": offsets(responses), "tokens_N": flat(responses),
                                     "prompt_offsets_B1": offsets([prompt] * 2), "prompt_tokens_P": flat([prompt] * 2)})
    decoded, spans = token_char_offsets(tok, response)
    release = next(i for i, (_, end) in enumerate(spans) if end > decoded.index("That"))
    T = len(response)
    valid = torch.arange(T)[None, :] < torch.tensor([T, T - 2])[:, None]
    t = torch.arange(T, dtype=torch.float32)
    margin = torch.where(t < release, 3.0, 0.2) + 0.05 * torch.sin(t)
    gen = torch.Generator().manual_seed(0)
    sig = BatchSignals(valid, *(torch.rand(2, T, generator=gen) * valid for _ in range(3)),
                       margin_BT=margin.expand(2, T) * valid, reverse_kl_BT=torch.zeros(2, T))
    return rollouts, sig, release


def test_release_methods_supervise_nothing_after_the_release_point(tiny_world):
    rollouts, sig, release = _planted_release_batch(tiny_world["tokenizer"])
    rule = ReleaseRule(lam=2.0, min_segments=3, min_prefix_segments=1, sigma2="residual")
    pre, rel = train.build_mask("release", rollouts, sig, tiny_world["tokenizer"], 0.5, rule, seed=0)
    assert rel == [release, release]
    assert torch.equal(pre, sig.valid_BT & (torch.arange(sig.valid_BT.shape[1]) < release))
    mask, rel2 = train.build_mask("release+ta_opd", rollouts, sig, tiny_world["tokenizer"], 0.5, rule, seed=0)
    assert rel2 == rel
    assert not bool(mask[:, release:].any())
    assert bool((mask & ~pre).sum() == 0) and int(mask.sum()) == math.ceil(0.5 * int(pre.sum()))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_update_computes_logits_only_at_supervised_positions(trainer, monkeypatch, aggregation):
    seen = []
    real = update.forward.supervised_map

    def spy(model, prompts, responses, keep_N, *rest):
        seen.append((keep_N.clone(), [len(r) for r in responses]))
        return real(model, prompts, responses, keep_N, *rest)

    monkeypatch.setattr(update.forward, "supervised_map", spy)
    out = train.run_step(with_flags(trainer, method="ta_opd", ratio=0.2, aggregation=aggregation), t=2)
    (keep, lengths), = seen  # teacher scoring goes through opd.engines.score, not this name
    assert keep.dtype == torch.bool and int(keep.sum()) == int(out.mask_BT.sum())
    # every sequence is cut right after its last supervised token
    expected = [int(row.nonzero()[-1, 0]) + 1 for row in out.mask_BT if row.any()]
    assert lengths == expected and keep.numel() == sum(expected)


def test_official_variant_runs_and_records_its_signals(tiny_world, tmp_path, mlflow_uri):
    """--signal-variant official end to end on the miniature world: float64 signals, the official random
    stream at counter t − 1, per-sample loss aggregation, and the resolved values in metrics.json."""
    out = tmp_path / "official"
    final = train.main(argv(tiny_world, out, "--method", "random", "--ratio", "0.3", "--steps", "2",
                            "--signal-variant", "official", "--signal-quantiles", "0.1", "1.0", "--name", "official"))
    recorded = json.loads((out / "metrics.json").read_text())["signals"]
    assert recorded == final["signals"]
    assert recorded["variant"] == "official" and recorded["overrides"] == "quantiles"
    assert recorded["aggregation"] == "sequence_mean" and recorded["budget"] == "official"
    assert recorded["quantiles"] == [0.1, 1.0] and recorded["precision"] == "float64"
    assert math.isfinite(final["loss"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test_train").experiment_id], "tags.model = 'official'")
    params = run.data.params
    assert (params["signal_variant"], params["signal_overrides"], params["aggregation"]) == \
        ("official", "quantiles", "sequence_mean")
    assert (params["signal_budget"], params["signal_random_stream"], params["signal_quantiles"]) == \
        ("official", "official", "[0.1, 1.0]")


def test_official_random_stream_in_a_training_step(trainer):
    official = {f"signal_{k}": v for k, v in OFFICIAL.as_dict().items() if k != "aggregation"}
    tr = with_flags(trainer, method="random", ratio=0.3, aggregation="sequence_mean", signal_variant="official",
                    **official)
    out = train.run_step(tr, t=3)
    assert out.signals.entropy_BT.dtype == torch.float64
    valid = out.signals.valid_BT
    n = math.ceil(0.3 * int(valid.sum()))
    # The first n of random.Random(42 + 2)'s shuffle of the valid positions (row-major), then every sequence
    # left without a position gets its best by the ta_opd_ent score.
    order = [tuple(ix) for ix in valid.nonzero().tolist()]
    random.Random(42 + 2).shuffle(order)
    drawn = set(order[:n])
    kept = {tuple(ix) for ix in out.mask_BT.nonzero().tolist()}
    assert drawn <= kept
    assert all(b in {p[0] for p in drawn} or sum(1 for p in kept if p[0] == b) == 1 for b in range(valid.shape[0]))
    assert len(kept - drawn) == sum(1 for b in range(valid.shape[0]) if b not in {p[0] for p in drawn})


def _final_state(out):
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("tokens_per_second")  # wall-clock timing, the only metric allowed to differ
    return metrics, load_file(str(out / "model" / "model.safetensors"))


class Killed(Exception):
    pass


def test_kill_and_resume_replays_exactly(tiny_world, tmp_path, mlflow_uri, monkeypatch):
    common = ("--method", "ta_opd", "--ratio", "0.3", "--steps", "4", "--checkpoint-every", "1", "--seed", "7",
              "--warmup-steps", "3")  # resumed mid warm-up: the scheduler state matters
    train.main(argv(tiny_world, tmp_path / "A", *common, "--name", "A"))
    real = train.save_checkpoint

    def crash_after_step_2(out_dir, step, *rest, **kw):
        path = real(out_dir, step, *rest, **kw)
        if step == 2:
            raise Killed
        return path

    monkeypatch.setattr(train, "save_checkpoint", crash_after_step_2)
    with pytest.raises(Killed):
        train.main(argv(tiny_world, tmp_path / "B", *common, "--name", "B"))
    monkeypatch.setattr(train, "save_checkpoint", real)
    ckpts = tmp_path / "B" / "checkpoints"
    (ckpts / "step_000003").mkdir()  # a leftover without state.json: not a checkpoint, gets replaced
    (ckpts / "step_000003" / "model.pt").write_bytes(b"junk")
    run_id = json.loads((ckpts / "step_000002" / "state.json").read_text())["run_id"]
    train.main(argv(tiny_world, tmp_path / "B", *common, "--name", "B"))

    (metrics_a, weights_a), (metrics_b, weights_b) = _final_state(tmp_path / "A"), _final_state(tmp_path / "B")
    assert metrics_a == metrics_b and metrics_a["step"] == 4
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004"]  # a finished run keeps its last one

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("test_train")
    (run,) = client.search_runs([exp.experiment_id], "tags.model = 'B'")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]


def _kill_when_complete(cmd: list[str], checkpoint, timeout: float = 300.0, env=None) -> None:
    """Run cmd; SIGKILL it (its whole process group: torchrun's ranks too) as soon as `checkpoint` is
    complete (its state.json is there)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (checkpoint / "state.json").is_file():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before {checkpoint.name} was complete, "
                            f"so it could not be killed after it:\n{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no complete {checkpoint.name} after {timeout:.0f} s")
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run finished (exit {proc.returncode}) before the SIGKILL reached it: make its steps slower")


@pytest.mark.slow
def test_sigkilled_process_resumes_and_replays_exactly(tiny_world, tmp_path, mlflow_uri):
    """A real kill: `python -m opd.engines.train` gets SIGKILL once step 2 is checkpointed, then runs again."""
    common = ("--method", "ta_opd", "--ratio", "0.3", "--steps", "4", "--checkpoint-every", "1", "--seed", "3",
              "--warmup-steps", "3", "--max-new-tokens", "160")  # longer responses: slower steps after the kill
    train.main(argv(tiny_world, tmp_path / "A", *common, "--name", "killA"))
    cmd = [sys.executable, "-m", "opd.engines.train", *argv(tiny_world, tmp_path / "B", *common, "--name", "killB")]
    _kill_when_complete(cmd, tmp_path / "B" / "checkpoints" / "step_000002")
    assert not (tmp_path / "B" / "metrics.json").exists() and not (tmp_path / "B" / "model").exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    (metrics_a, weights_a), (metrics_b, weights_b) = _final_state(tmp_path / "A"), _final_state(tmp_path / "B")
    assert metrics_a == metrics_b and metrics_a["step"] == 4
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    ckpts = tmp_path / "B" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004"]  # no temporary left over, the last kept

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test_train").experiment_id], "tags.model = 'killB'")
    assert run.info.status == "FINISHED"
    # one row per step: a step logged after the last checkpoint, before the kill, is not logged again
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert run.data.tags["opd.killed"] == "true"


@pytest.mark.parametrize("extra, match", [
    (("--method", "nope"), "--method: 'nope' is not allowed; allowed values: 'full', 'release'"),
    (("--method", "ta_opd", "--ratio", "0"), r"--ratio: 0.0 is out of range; allowed: \(0, 1\] \(config train.ratio\)"),
    (("--method", "ta_opd", "--ratio", "1.5"), r"--ratio: 1.5 is out of range; allowed: \(0, 1\]"),
    (("--method", "full", "--top-k", "1"), r"--top-k: 1 is out of range; allowed: \[2, 1024\]"),
    (("--method", "release", "--sigma2", "big"), "--sigma2 must be"),
])
def test_bad_flags_fail_before_any_step(tiny_world, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        train.main(argv(tiny_world, tmp_path / "out", "--steps", "1", *extra))
    assert not (tmp_path / "out").exists()


def test_teacher_with_another_tokenizer_fails_before_any_step(tiny_world, tmp_path):
    from opd.engines.score import TokenizerMismatch

    from opd.worlds.miniature import generator as toy
    from opd.worlds.miniature.tokenizer import train_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_world["teacher"], teacher)
    # Another regular vocabulary (an added token alone would be a pair across templates: tests/test_pairing.py).
    train_tokenizer([p + t for p, t in toy.iter_problems(toy.generate("reverse", 40, 1, "x"))], 300).save_pretrained(
        str(teacher))
    args = argv(tiny_world, tmp_path / "out", "--method", "full", "--steps", "1")
    args[args.index("--teacher") + 1] = str(teacher)
    with pytest.raises(TokenizerMismatch, match="differ"):
        train.main(args)
    assert not (tmp_path / "out").exists()


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tiny_world, tmp_path, mlflow_uri, monkeypatch):
    real, calls = update.opd_loss, []

    def poisoned(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(update, "opd_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="at step 2"):
        train.main(argv(tiny_world, out, "--method", "full", "--steps", "3", "--checkpoint-every", "1"))
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step_000001"]
    assert train.load_latest_checkpoint(out)["step"] == 1
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_changed_flags_restart_afresh_only_when_asked(tiny_world, tmp_path):
    """A rerun with other flags is refused, unless --restart-if-flags-changed: then the old checkpoints are
    renamed aside (nothing deleted) and training starts from step 0."""
    base = ["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
            "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(tmp_path), "--method", "full",
            "--steps", "1", "--prompts-per-step", "2", "--samples", "1", "--max-new-tokens", "8",
            "--top-k", "4", "--checkpoint-every", "1"]
    train.main(base)
    with pytest.raises(ValueError, match="other flags \\(lr\\)"):
        train.main(base + ["--lr", "0.001"])
    final = train.main(base + ["--lr", "0.001", "--restart-if-flags-changed"])
    assert final["step"] == 1
    assert len(list(tmp_path.glob("checkpoints.replaced-*/step_000001/state.json"))) == 1


def test_memory_flags_may_change_on_resume(tiny_world, tmp_path, mlflow_uri, monkeypatch):
    """The micro-batch budget, the logit chunk and gradient checkpointing bound memory, not the math: a run
    stopped after step 1 (a NaN at step 2) resumes with other bounds from its step-1 checkpoint, no restart."""
    real, calls = update.opd_loss, []
    monkeypatch.setattr(update, "opd_loss", lambda *a, **kw: real(*a, **kw) * (float("nan") if calls.append(1) or
                                                                                len(calls) == 2 else 1.0))
    base = argv(tiny_world, tmp_path, "--method", "full", "--steps", "2", "--checkpoint-every", "1")
    with pytest.raises(FloatingPointError, match="at step 2"):
        train.main(base)
    resumed = []
    monkeypatch.setattr(update, "opd_loss", lambda *a, **kw: resumed.append(1) or real(*a, **kw))
    memory = ["--max-tokens-per-microbatch", "4096", "--logit-chunk", "3", "--gradient-checkpointing"]
    assert train.main(base + memory)["step"] == 2
    assert len(resumed) == 1  # step 2 only: it went on from the step-1 checkpoint
    assert not list(tmp_path.glob("checkpoints.replaced-*"))


@pytest.mark.parametrize("loss", ["topk_reverse_kl", "topk_forward_kl", "topk_jsd"])
def test_distribution_losses_train_a_step(trainer, loss):
    before = [p.detach().clone() for p in trainer.student.parameters()]
    out = train.run_step(with_flags(trainer, method="ta_opd", ratio=0.3, loss=loss, aggregation="token_mean"), t=1)
    assert math.isfinite(out.metrics["loss"]) and out.metrics["loss"] >= -1e-6  # a KL/JSD is never negative
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    with_flags(trainer, loss="pg")


def test_unknown_loss_is_refused(tiny_world, tmp_path):
    args = train.parse_args(argv(tiny_world, tmp_path, "--method", "full", "--loss", "mse"))
    with pytest.raises(ValueError, match="--loss: 'mse' is not allowed; allowed values: 'pg', 'topk_reverse_kl'"):
        train.check_args(args)


def test_checkpoints_hold_cpu_tensors(tiny_world, tmp_path, mlflow_uri):
    train.main(argv(tiny_world, tmp_path, "--method", "full", "--steps", "1", "--samples", "1"))
    ckpt = train.load_latest_checkpoint(tmp_path)
    tensors = list(ckpt["model"].values()) + [t for s in ckpt["trainer"]["optimizer"]["state"].values()
                                              for t in s.values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def test_save_dtype_and_keep_checkpoints(tiny_world, tmp_path, mlflow_uri, monkeypatch):
    """--save-dtype bfloat16: the final weights are the fp32 checkpoint's rounded to bf16 (tied LM head stored
    once); --keep-checkpoints 2: at most two checkpoints while training, only the last one once finished."""
    real, seen = train.save_checkpoint, []

    def recording(out_dir, step, *rest, **kw):
        path = real(out_dir, step, *rest, **kw)
        seen.append([p.name for p in checkpoint.complete_checkpoints(out_dir / "checkpoints")])
        return path

    monkeypatch.setattr(train, "save_checkpoint", recording)
    out = tmp_path / "out"
    train.main(argv(tiny_world, out, "--method", "full", "--steps", "3", "--checkpoint-every", "1",
                    "--save-dtype", "bfloat16", "--keep-checkpoints", "2"))
    assert seen == [["step_000001"], ["step_000001", "step_000002"], ["step_000002", "step_000003"]]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"]
    fp32 = train.load_latest_checkpoint(out)["model"]
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    assert all(torch.equal(t, fp32[k].to(torch.bfloat16)) for k, t in saved.items())
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"--keep-checkpoints: 0 is out of range; allowed: \[1, inf\] \(config train.keep_checkpoints\)"):
        train.check_args(train.parse_args(argv(tiny_world, out, "--method", "full", "--keep-checkpoints", "0")))
