"""Training's device and precision flags (opd.engines.accel) on the tiny world."""
import math

import pytest
import torch

from opd.engines import train
from test_train import argv


def test_device_flags_resolve_and_cuda_without_a_gpu_is_refused(tiny_world, tmp_path):
    from opd.engines import accel

    assert accel.resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert accel.resolve_device("auto", local_rank=0) == expected
    if torch.cuda.is_available():  # under torchrun, rank r's device is cuda:LOCAL_RANK
        assert accel.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    args = train.parse_args(argv(tiny_world, tmp_path, "--method", "full"))
    assert (args.device, args.dtype, args.rollout_backend, args.prompt_format) == ("auto", "float32", "hf", "plain")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda, but torch sees no CUDA device"):
            train.setup(train.parse_args(argv(tiny_world, tmp_path, "--method", "full", "--device", "cuda")))


def test_bfloat16_keeps_fp32_master_weights_and_trains_a_step(tiny_world, tmp_path):
    """bf16 autocast (on CPU here) with fp32 student weights and optimizer state; a bf16 teacher."""
    args = train.parse_args(argv(tiny_world, tmp_path, "--method", "ta_opd", "--ratio", "0.3", "--dtype", "bfloat16"))
    tr = train.setup(args)
    assert all(p.dtype == torch.float32 for p in tr.student.parameters())
    assert all(p.dtype == torch.bfloat16 for p in tr.teacher.parameters())
    before = [p.detach().clone() for p in tr.student.parameters()]
    out = train.run_step(tr, t=1)
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert all(p.dtype == torch.float32 for p in tr.student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))
    state = tr.optimizer.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
