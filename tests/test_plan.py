"""The memory planner (opd.studies.plan): terms worked out by hand, validation, and estimates vs CPU peaks."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.infra.config import ConfigError, validate_config
from opd.studies import plan

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
# V=10, H=4, one layer, one head of 4, one KV head, MLP 8, tied: root 10·4 + 4 = 44 parameters; the layer
# 2·4·4 (q, o) + 2·4·4 (k, v) + 3·4·8 (MLP) + 2·4 (norms) + 2·4 (q/k norms) = 176.
TINY = plan.Shape(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                  head_dim=4, intermediate_size=8, tie_word_embeddings=True)


def paper() -> dict:
    with open(REPO / "config" / "paper.yaml") as fh:
        return validate_config(yaml.safe_load(fh))


def test_terms_by_hand():
    assert (TINY.root_params(), TINY.layer_params(), TINY.params()) == (44, 176, 220)
    # per token and layer 6H + 8q + 4kv + 4I = 24 + 32 + 16 + 32 = 104 elements; trunk 4H = 16
    assert TINY.layer_elements() == 104
    assert plan.activation_bytes(TINY, 10, 4, checkpointing=False) == 10 * (104 * 4 + 16 * 4)
    assert plan.activation_bytes(TINY, 10, 4, checkpointing=True) == 10 * (4 * 4 + 104 * 4 + 16 * 4)
    assert plan.logit_bytes(TINY, 3, 4) == 3 * 10 * 16
    st = plan.Settings(gpus=4, sharding="fsdp", compute_bytes=2, rank_tokens=100, microbatch=None, logit_chunk=None,
                       checkpointing=False, vllm_fraction=0, kv_sequences=0, seq_tokens=10)
    assert plan.student_bytes(TINY, st) == {"student weights": 220.0, "gradients": 220.0, "AdamW state": 440.0,
                                            "FSDP all-gathered": 2 * (44 + 2 * 176), "FSDP replica": 440}
    ddp = plan.student_bytes(TINY, plan.dataclasses.replace(st, sharding="ddp"))
    assert ddp == {"student weights": 880, "gradients": 880, "AdamW state": 1760, "DDP buckets": 880}


def test_null_logit_chunk_is_the_engines_default_and_fixed_context_phases_by_hand():
    """logit_chunk null = 2**28 bytes of float32 logits per chunk, as opd.engines.forward (441 positions at
    151,936, 131,072 at 512; at most the micro-batch); the fixed-context job holds its gradients and AdamW
    only in the τ steps and its teacher only in the KL passes."""
    from opd.engines import forward

    st = plan.Settings(gpus=1, sharding="ddp", compute_bytes=4, rank_tokens=100_000, microbatch=16384,
                       logit_chunk=None, checkpointing=False, vllm_fraction=0, kv_sequences=0, seq_tokens=10)
    assert (st.chunk(151_936), st.chunk(512), st.chunk(10)) == (441, 16384, 16384)
    assert forward.chunk_positions(None, 151_936) == 441
    assert plan.dataclasses.replace(st, logit_chunk=7).chunk(151_936) == 7
    small = plan.dataclasses.replace(st, microbatch=20, rank_tokens=20)
    e = plan.fixed_context_estimate(("t", "s"), TINY, TINY, small, cap=None)
    P = 220  # TINY's parameters
    update = plan.activation_bytes(TINY, 20, 4, False) + 20 * 10 * 16  # activations, one 20-position chunk
    scoring = 20 * (4 * 4 + 2 * 8 + 4 + 2 * 4) * 4 + 20 * 10 * (4 + 8)
    assert e.static == {"student weights": 4 * P, "CUDA context": GIB}
    assert e.peak == 4 * P + GIB + max(update + 12 * P, scoring + 4 * P)
    assert e.terms()["teacher"] == 4 * P and e.terms()["AdamW state"] == 8 * P


def test_qwen3_sizes_match_the_model_cards():
    config = paper()
    sizes = {n: plan.model_shape(config, n)[0].params() for n in config["models"]}
    # Qwen3-1.7B: 1.4B non-embedding + 151,936 × 2,048 tied embeddings; Qwen3-8B untied: 8.2B
    assert sizes["qwen3_1p7b"] == 1_720_574_976
    assert round(sizes["qwen3_4b"] / 1e9, 2) == 4.02 and round(sizes["qwen3_8b"] / 1e9, 2) == 8.19


def test_paper_config_fits_an_80gb_gpu_for_every_pair():
    config = paper()
    assert plan.config_problems(config) == []
    found = plan.estimates(config)[0]
    trains = [e for e in found if e.kind == "train"]
    assert len(trains) == 3 and all(e.peak <= 79 * GIB for e in found)
    assert config["resources"]["diagnose"]["gpu_mem_gb"] == config["resources"]["train"]["gpu_mem_gb"] == 79
    assert {e.job: e.settings.gpus for e in trains} == {"train qwen3_8b -> qwen3_1p7b": 2,
                                                       "train qwen3_8b -> qwen3_4b": 4,
                                                       "train qwen3_4b -> qwen3_1p7b": 2}


def test_a_job_that_cannot_fit_stops_validation_naming_pair_estimate_and_fix():
    with open(REPO / "config" / "paper.yaml") as fh:
        raw = yaml.safe_load(fh)
    raw["train"]["pairs"][1]["gpu"] = 2  # the 4B student on two 80 GB GPUs
    with pytest.raises(ConfigError) as err:
        validate_config(copy.deepcopy(raw), checks=[plan.config_problems])
    msg = str(err.value)
    assert "train qwen3_8b -> qwen3_4b: estimated peak " in msg and "GiB per GPU > resources.train.gpu_mem_gb 79" in msg
    assert "fits with train.sharding: fsdp and 4 GPUs" in msg
    assert "qwen3_1p7b: estimated" not in msg  # the pairs that fit are not named
    raw["train"]["pairs"][1]["gpu"] = 1
    raw["train"]["sharding"] = "ddp"
    raw["train"]["max_tokens_per_microbatch"] = 10**8  # the whole share of 64 × 4 × 8.7k tokens at once
    with pytest.raises(ConfigError, match=r"train qwen3_8b -> qwen3_1p7b: estimated peak \d+\.\d GiB"):
        validate_config(copy.deepcopy(raw), checks=[plan.config_problems])


def test_fsdp_on_one_gpu_is_refused_at_validation():
    with open(REPO / "config" / "paper.yaml") as fh:
        raw = yaml.safe_load(fh)
    raw["train"]["pairs"][0]["gpu"] = 1
    with pytest.raises(ConfigError, match="train.sharding: fsdp needs more than one GPU for pair qwen3_8b -> "):
        validate_config(raw, checks=[plan.config_problems])


def test_config_json_on_disk_wins_and_a_contradicting_shape_key_is_an_error(tmp_path):
    config = paper()
    config["results_dir"] = str(tmp_path)
    model = tmp_path / "models" / "qwen3_1p7b"
    model.mkdir(parents=True)
    hub = {**config["models"]["qwen3_1p7b"]["shape"], "num_hidden_layers": 28, "model_type": "qwen3"}
    (model / "config.json").write_text(json.dumps(hub))
    assert plan.model_shape(config, "qwen3_1p7b")[1] == []
    (model / "config.json").write_text(json.dumps({**hub, "hidden_size": 1024}))
    shape, problems = plan.model_shape(config, "qwen3_1p7b")
    assert shape is None
    assert problems == [f"models.qwen3_1p7b.shape.hidden_size: 2048 contradicts hidden_size=1024 in "
                        f"{model / 'config.json'}"]
    with pytest.raises(ConfigError, match=r"models.qwen3_1p7b.shape.hidden_size: 2048 contradicts"):
        validate_config(config, checks=[plan.config_problems])


def test_planner_prints_every_job(capsys):
    text = plan.main(["--configfile", str(REPO / "config" / "paper.yaml")])
    assert capsys.readouterr().out.strip() == text.strip()
    memory = text.split("\n\nCost on")[0]  # paper.yaml's resources.gpu_type adds the cost table (tests/test_cost.py)
    rows = [r for r in memory.splitlines() if r.startswith("| train") or r.startswith("| fixed_context")]
    assert len(rows) == 6 and "Every job fits its gpu_mem_gb." in memory


# (V, H, layers, heads, kv_heads, head_dim, intermediate, sequences, prompt, response): weights-and-optimizer-,
# activation- and logit-dominated shapes. Measured (2-core CPU, fp32): estimate / peak = 0.87, 0.87, 0.99.
SHAPES = [(32000, 512, 4, 8, 4, 64, 1536, 1, 64, 448), (1000, 256, 8, 4, 2, 64, 768, 4, 64, 960),
          (151936, 64, 2, 2, 1, 32, 128, 1, 16, 384)]


@pytest.mark.slow
@pytest.mark.parametrize("dims", SHAPES)
def test_estimate_is_within_20_percent_of_the_measured_cpu_peak(dims):
    """Two fp32 update steps (logits at every response position, AdamW) in a fresh process: the planner's
    weights + gradients + AdamW + activations (no checkpointing) + logits, against the RSS high-water mark."""
    V, H, L, nh, kv, hd, I, B, P, R = dims
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "plan_peak.py"), *map(str, dims)], capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    shape = plan.Shape(V, H, L, nh, kv, hd, I, True)
    assert measured["params"] == shape.params()
    estimate = 16 * shape.params() + plan.activation_bytes(shape, B * (P + R), 4, False) + plan.logit_bytes(shape,
                                                                                                           B * R, 4)
    assert 0.8 <= estimate / measured["peak"] <= 1.2, f"estimate {estimate / 1e6:.0f} MB, measured " \
                                                      f"{measured['peak'] / 1e6:.0f} MB"


def test_snakemake_stops_at_validation_when_a_job_cannot_fit(tmp_path):
    """The workflow runs the planner's check at load: no job is planned, the message names the pair."""
    with open(REPO / "config" / "paper.yaml") as fh:
        pairs = yaml.safe_load(fh)["train"]["pairs"]
    pairs[1]["gpu"] = 2
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"pairs": pairs}}))
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "paper.yaml"),
                           str(overlay)], capture_output=True, text=True, timeout=300,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "train qwen3_8b -> qwen3_4b: estimated peak" in out and "resources.train.gpu_mem_gb 79" in out
    assert "fits with train.sharding: fsdp and 4 GPUs" in out and "Job stats" not in out
