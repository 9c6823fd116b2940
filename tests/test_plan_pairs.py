"""The memory planner on TA-OPD's four pairs (issue 20): hub shapes from the table, every job fits 79 GiB."""

from pathlib import Path

from opd.studies import hub_shapes, plan

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
OVERLAY = [REPO / "config" / "paper.yaml", REPO / "tests" / "config" / "ta_opd_pairs.yaml"]


def test_hub_shapes_match_the_model_cards_parameter_counts():
    size = {hub: plan.Shape(**s).params() for hub, s in hub_shapes.HUB_SHAPES.items()}
    # Qwen3-14B (card: 14.8B, 13.2B non-embedding): 40 layers × 330,311,936 + 2 × 151,936 × 5,120 + 5,120.
    assert size["Qwen/Qwen3-14B"] == 40 * 330_311_936 + 2 * 151_936 * 5_120 + 5_120
    # Qwen2.5-3B (card: 3.09B, 2.77B non-embedding; tied): 36 × 77,074,688 + 151,936 × 2,048 + 2,048.
    assert size["Qwen/Qwen2.5-3B"] == 36 * 77_074_688 + 151_936 * 2_048 + 2_048
    assert round(size["Qwen/Qwen2.5-3B"] / 1e9, 2) == 3.09
    # Qwen2.5-14B / the R1 distill (14,770,033,664 with q/k/v biases and no q/k norms: 48 × (7,168 − 256) more).
    assert size["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"] + 48 * (7_168 - 256) == 14_770_033_664
    assert hub_shapes.hub_shape("no/such-model") == {}


def test_config_shape_keys_override_the_table():
    config = plan.load_config(OVERLAY)
    config["models"]["qwen2p5_3b"]["shape"] = {"num_hidden_layers": 1}
    assert plan.model_shape(config, "qwen2p5_3b")[0].num_hidden_layers == 1


def test_every_ta_opd_pair_fits_an_80gb_gpu_at_its_gpu_count():
    config = plan.load_config(OVERLAY)
    assert plan.config_problems(config) == []
    found = plan.estimates(config)[0]
    assert all(e.peak <= 79 * GIB for e in found)
    trains = {e.job: e.settings.gpus for e in found if e.kind == "train"}
    assert trains == {"train qwen3_4b -> qwen3_1p7b": 2, "train qwen3_8b -> qwen3_4b": 4,
                      "train qwen3_14b -> qwen3_4b": 8, "train r1_distill_qwen_14b -> qwen2p5_3b": 8}
    # A 14B teacher (27.5 GiB in bf16, on every rank) does not fit beside the 4B student on 4 GPUs.
    e = plan.train_estimate(config, ("qwen3_14b", "qwen3_4b"), plan.model_shape(config, "qwen3_4b")[0],
                            plan.model_shape(config, "qwen3_14b")[0], gpus=4)
    assert not e.fits and round(e.terms()["teacher"] / GIB, 1) == 27.5
