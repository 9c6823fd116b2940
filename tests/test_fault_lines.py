"""Faults and bad files told in one line with the path, nothing complete lost: a full disk during a checkpoint
or model save, a corrupt weight file, a prompts file with a repeated id or an empty field."""

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from opd.engines import checkpoint, train
from opd.infra import io, modeldirs
from opd.infra.io import DataFileError, Fault

from test_faults import no_weights  # noqa: F401 - fixture
from test_train import argv

MIB = 2 ** 20


def _states(n: int = 4 * MIB // 4):
    """A 4 MiB model state and an 8 MiB optimizer state (float32)."""
    return {"w": torch.zeros(n)}, {"state": {0: {"exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}}}


def _save(out: Path, step: int):
    model, opt = _states()
    return checkpoint.save_checkpoint(out, step, argparse.Namespace(lr=1.0), model, opt, {}, "run", {"loss": step})


def _disk(monkeypatch, free: int):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage._replace(free=free))


def test_checkpoint_refused_before_writing_when_the_disk_is_too_full(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    _disk(monkeypatch, 5 * MIB)  # the states need 12 MiB
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: pytest.fail("written despite the check"))
    with pytest.raises(Fault) as err:
        _save(tmp_path, 2)
    assert str(err.value) == (f"{tmp_path / 'checkpoints' / 'step_000002'}: no space left on the device (5 MiB free, "
                              f"the write needs about 12 MiB); the previous checkpoint {first} is kept: free some "
                              f"space and rerun to resume from it")
    monkeypatch.undo()
    assert checkpoint.load_latest_checkpoint(tmp_path)["step"] == 1


def test_disk_filling_during_a_checkpoint_save_is_one_line_and_resume_finds_the_previous(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    real_save = torch.save

    def fill_the_disk(obj, path, *a, **k):  # what torch does when the disk fills mid-write
        Path(path).write_bytes(b"\0" * 1000)
        _disk(monkeypatch, 0)
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(checkpoint.torch, "save", fill_the_disk)
    with pytest.raises(Fault) as err:
        _save(tmp_path, 2)
    assert str(err.value).startswith(f"{tmp_path / 'checkpoints' / 'step_000002'}: no space left on the device "
                                     f"(0 MiB free, the write needs about 12 MiB); the previous checkpoint {first}")
    assert isinstance(err.value.__cause__, RuntimeError)  # OPD_TRACEBACK=1 shows torch's own error
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]  # no half checkpoint
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    monkeypatch.setattr(io.shutil, "disk_usage", shutil.disk_usage)
    ckpt = checkpoint.load_latest_checkpoint(tmp_path)
    assert ckpt["step"] == 1 and ckpt["metrics"] == {"loss": 1}


def test_an_unrelated_write_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("something else")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(RuntimeError, match="^something else$"):
        _save(tmp_path, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_model_save_on_a_full_disk_keeps_the_model_already_there(tiny_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"]))
    out = tmp_path / "model"
    io.save_model_dir(model, tiny_world["tokenizer"], out)
    before = (out / "model.safetensors").read_bytes()
    need = io.tensor_bytes(model.state_dict())
    assert need == 4 * sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    _disk(monkeypatch, need // 2)
    with pytest.raises(Fault) as err:
        io.save_model_dir(model, tiny_world["tokenizer"], out)
    assert str(err.value) == (f"{out}: no space left on the device ({need // 2 / MIB:.0f} MiB free, the write needs "
                              f"about {need / MIB:.0f} MiB); the model already in {out} is kept")
    assert (out / "model.safetensors").read_bytes() == before and not (tmp_path / "model.tmp").exists()


def test_corrupt_weights_are_named_with_their_role_before_any_weights_load(tiny_world, tmp_path, no_weights):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_world["teacher"], teacher)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    args = argv(tiny_world, tmp_path / "out", "--method", "full")
    args[args.index("--teacher") + 1] = str(teacher)
    with pytest.raises(modeldirs.ModelDirError) as err:
        train.main(args)
    assert str(err.value) == (f"--teacher {weights}: truncated or corrupt ({size // 2} bytes, its header describes "
                              f"{size}); delete the model directory and rerun the job that made it (or fetch it again)")
    weights.write_bytes(b"\xff" * 64)  # a header length far beyond the file
    assert modeldirs.weight_problems(teacher) == [f"{weights}: truncated or corrupt (64 bytes, too short for its header)"]
    assert modeldirs.weight_problems(tiny_world["student"]) == []


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "question": "1+1", "answer": "2"}', '{"id": "b", "question": "2+2", "answer": "4"}',
      '{"id": "a", "question": "3+3", "answer": "6"}'], "{path}:3: duplicate id 'a' (first at line 1); "
                                                        "each prompt needs its own id"),
    (['{"id": "a", "question": " ", "answer": "2"}'], "{path}:1: empty question (id 'a')"),
    (['{"id": 1, "question": "1+1", "answer": "2"}', '', '{"id": 2, "question": "1+2", "answer": ""}'],
     "{path}:3: empty answer (id 2)"),
])
def test_prompts_file_with_a_repeated_id_or_an_empty_field_is_refused(tiny_world, tmp_path, no_weights, lines,
                                                                      message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError) as err:
        io.read_prompts(path)
    assert str(err.value) == message.format(path=path)
    args = argv(tiny_world, tmp_path / "out", "--method", "full")
    args[args.index("--prompts") + 1] = str(path)
    with pytest.raises(DataFileError) as err:  # training reads it before any model
        train.main(args)
    assert str(err.value) == message.format(path=path)
