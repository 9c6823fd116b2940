"""benchmarks/train_mfu.py: the FLOPs formula by hand, and a tiny CPU run of the real OPD update."""

import math

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_mfu")


def test_flops_formula_by_hand(bench):
    shape = {"vocab": 10, "hidden": 4, "layers": 2, "heads": 3, "head_dim": 5}
    # trunk 6·100·(2·8) + head 6·10·4·7 + attention 12·2·3·5·8·(2·8)
    assert bench.step_flops(100, shape, batch=2, seq=8, supervised=7) == 9600 + 1680 + 46080


def test_tiny_preset_runs_the_opd_update_on_cpu(bench):
    out = bench.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "2", "--seq", "32",
                      "--prompt-len", "8", "--steps", "2", "--warmup", "1", "--threads", "1"])
    # 2 layers × (q 64·64 + k 64·32 + v 64·32 + o 64·64 + q/k norms 2·16 + MLP 3·64·192 + 2 norms 2·64)
    # + the final norm 64
    assert out["non_embedding_params"] == 2 * (4096 + 2048 + 2048 + 4096 + 32 + 36864 + 128) + 64
    assert out["supervised_positions"] == 2 * 24  # --keep 1.0: every response position
    assert out["flops_per_step"] == bench.step_flops(98688, bench.PRESETS["tiny"], 2, 32, 48)
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in ("tokens_per_second", "achieved_tflops", "mfu"))
    assert out["mfu"] == pytest.approx(out["achieved_tflops"] / out["peak_tflops"])


def test_tiny_preset_with_bf16_autocast_and_a_distribution_loss(bench):
    out = bench.main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--seq", "16", "--prompt-len", "4",
                      "--steps", "1", "--warmup", "1", "--keep", "0.5", "--loss", "topk_reverse_kl", "--threads", "1"])
    assert out["dtype"] == "bfloat16" and 2 <= out["supervised_positions"] < 24 and out["mfu"] > 0
