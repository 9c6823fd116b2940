"""The cost planner (opd.studies.cost): the decode model by hand, the budget at validation, bad input, the CLI."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from opd.infra import hardware
from opd.infra.config import ConfigError, validate_config
from opd.infra.io import InputError
from opd.studies import cost, plan
from opd.studies import cost_model as cm
from opd.studies.shapes import Shape

REPO = Path(__file__).resolve().parents[1]
# Two layers, one query head and one KV head of width 4 (q = kv = 4), H 4, MLP 8, V 10.
TINY = Shape(vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
             head_dim=4, intermediate_size=8, tie_word_embeddings=True)


def paper(**resources) -> dict:
    with open(REPO / "config" / "paper.yaml") as fh:
        config = yaml.safe_load(fh)
    config["resources"].update(resources)
    return config


def test_decode_by_hand():
    # KV per token: K and V (2) x 2 layers x kv 4 x 2 bytes = 32 B. A sequence of 3 + 5 tokens reserves 256 B,
    # so a budget of 800 B holds 3 at once: 10 sequences in 4 waves (3, 3, 3, 1).
    assert cm.kv_bytes_per_token(TINY) == 32
    d = cm.decode(TINY, seqs=10, prompt=3, response=5, kv_budget=800, weight_bytes=1000)
    assert (d.concurrent, d.waves) == (3, 4)
    # weights: 4 waves x 5 steps x 1000 B; KV: step t reads 3 + t tokens (3+4+5+6+7 = 25), 10 sequences x 32 B
    assert d.bytes == 4 * 5 * 1000 + 10 * 32 * 25 == 28_000
    # FLOPs per new token: projections 2 x 2 layers x (2·4·4 + 2·4·4 + 3·4·8 = 160) = 640, head 2·4·10 = 80;
    # attention 4 x 2 layers x q 4 = 32 per token of context read: 10 x (5 x 720 + 32 x 25)
    assert d.flops == 10 * (5 * 720 + 32 * 25) == 44_000
    # vLLM's max_num_seqs caps it before the budget does; a budget below one sequence is an error
    assert cm.decode(TINY, 10, 3, 5, kv_budget=1e9, weight_bytes=0, max_seqs=4).waves == 3
    assert cm.decode(TINY, 10, 3, 5, kv_budget=float("inf"), weight_bytes=0, max_seqs=4).waves == 3  # hf generate
    with pytest.raises(ValueError, match="cannot hold one sequence of 8 tokens"):
        cm.decode(TINY, 10, 3, 5, kv_budget=255, weight_bytes=0)


def test_attention_and_update_terms_by_hand():
    # 3 query positions: dense 3 x 3 = 9 (query, key) pairs, causal 1 + 2 + 3 = 6; 4 x 2 layers x q 4 each
    assert cm.attention_flops(TINY, 3, "dense") == 32 * 9
    assert cm.attention_flops(TINY, 3, "causal") == 32 * 6
    fwd = cm.forward_flops(TINY, seqs=1, length=3, head_positions=2)
    assert fwd == 3 * 640 + 2 * 80 + 32 * 9
    # update: projections x3, attention x3.5, checkpointed head x4; checkpointing adds the layers less down_proj
    assert cm.update_flops(TINY, 1, 3, 2) == 3 * 3 * 640 + 3.5 * 32 * 9 + 4 * 2 * 80
    recompute = 3 * 2 * 2 * (160 - 4 * 8) + 32 * 9
    assert cm.update_flops(TINY, 1, 3, 2, checkpointing=True) == cm.update_flops(TINY, 1, 3, 2) + recompute


def test_phase_is_bounded_by_the_slower_of_compute_and_memory():
    a = cost.Assumptions(hardware.gpu("h100"), 0.5, 0.5, 1, 1, 1)
    # 989.4e12 x 0.5 FLOP/s and 3.35e12 x 0.5 B/s: 1 s of compute against 2 s of memory traffic
    p = cost.Phase("x", 494.7e12, 3.35e12).timed(a)
    assert (p.seconds, p.bound) == (pytest.approx(2.0), "memory")


def test_job_gpu_hours_and_async_overlap():
    phases = [cost.Phase("rollout decode", 0, 0, 30.0), cost.Phase("update", 0, 0, 20.0)]
    job = cost.JobCost("train_opd", "t", count=3, gpus=2, phases=phases, repeats=10)
    assert job.seconds == 500 and job.gpu_hours == pytest.approx(3 * 2 * 500 / 3600)
    assert cost.JobCost("train_opd", "t", 1, 1, phases, 10, overlap=True).seconds == 300  # max(30, 20) per step


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(InputError, match=r"resources.gpu_type: unknown GPU 'v100'; known: .*a100.*h100.*h200.*h800"):
        hardware.gpu("v100")
    with pytest.raises(ConfigError, match="resources.gpu_type: unknown GPU 'b300'"):
        validate_config(paper(gpu_type="b300"), checks=[cost.config_problems])
    with pytest.raises(SystemExit, match="--gpu: unknown GPU 'tpu'; known: a100"):
        plan.cli.run(lambda: plan.main(["--configfile", str(REPO / "config/paper.yaml"), "--gpu", "tpu"]))


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
@pytest.mark.parametrize("key", ["compute_efficiency", "bandwidth_efficiency"])
def test_efficiency_outside_zero_one(key, value):
    with pytest.raises(ConfigError, match=rf"resources.cost.{key}: {value} is out of range; allowed: \(0, 1\]"):
        validate_config(paper(cost={key: value}))


def test_response_length_above_its_limit_and_negative_budget():
    with pytest.raises(ConfigError, match=r"resources.cost.train_response_tokens: 9000 is above train.max_new_tokens "
                                          r"\(8192\)"):
        validate_config(paper(cost={"train_response_tokens": 9000}), checks=[cost.config_problems])
    with pytest.raises(ConfigError, match=r"resources.cost.eval_response_tokens: 40000 is above evaluation.max_gen"):
        validate_config(paper(gpu_type="h100", cost={"eval_response_tokens": 40000}), checks=[cost.config_problems])
    with pytest.raises(ConfigError, match=r"resources.budget_gpu_hours: -5 is out of range; allowed: \(0, inf\]"):
        validate_config(paper(budget_gpu_hours=-5))
    with pytest.raises(ConfigError, match="resources.budget_gpu_hours needs resources.gpu_type"):
        validate_config(paper(gpu_type=None, budget_gpu_hours=100), checks=[cost.config_problems])


def test_budget_below_the_estimate_stops_validation_with_the_three_biggest_drivers():
    config = validate_config(paper(gpu_type="h100"))
    jobs = cost.plan_costs(config)
    total = cost.totals(jobs)["total"]
    top = cost.drivers(jobs)
    with pytest.raises(ConfigError) as err:
        validate_config(paper(gpu_type="h100", budget_gpu_hours=round(total / 2)), checks=[cost.config_problems])
    msg = str(err.value)
    assert f"estimated at {total:,.0f} GPU-hours on NVIDIA H100 SXM5 80GB" in msg
    assert f"over the budget of {round(total / 2):,.0f}" in msg
    for i, (what, hours) in enumerate(top, 1):
        assert f"{i}) {what} {hours:,.0f} GPU-h" in msg
    assert "4)" not in msg
    validate_config(paper(gpu_type="h100", budget_gpu_hours=total * 1.01), checks=[cost.config_problems])


def test_no_budget_and_no_gpu_means_no_estimate(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("estimated without a gpu_type")

    config = paper()
    config["resources"].pop("gpu_type", None)
    config = validate_config(config)
    monkeypatch.setattr(cost, "plan_costs", boom)
    assert cost.config_problems(config) == []
    monkeypatch.undo()  # a GPU and no budget: the estimate is made (its inputs checked), nothing compared
    assert cost.config_problems(validate_config(paper(gpu_type="h100", budget_gpu_hours=None))) == []


def test_grouped_jobs_cover_the_paper_grid():
    jobs = cost.plan_costs(validate_config(paper()), "h200")
    by_rule = {}
    for j in jobs:
        by_rule[j.rule] = by_rule.get(j.rule, 0) + j.count
    assert by_rule == {"train_opd": 918, "eval_trained": 918, "lm_eval": 21, "rollout_initial": 2,
                       "score_initial": 3, "fixed_context": 3}
    train = next(j for j in jobs if j.job == "train qwen3_8b -> qwen3_4b")
    assert (train.gpus, train.repeats, train.notes["sequences_per_rank"]) == (4, 200, 64)
    assert [p.name for p in train.phases] == ["rollout prefill", "rollout decode", "student recompute",
                                              "teacher scoring", "update", "optimizer"]


def test_evaluation_seeds_multiply_the_evaluation_jobs():
    # 3 evaluation seeds: 3 x (21 lm_eval + 918 eval_trained) jobs, each as long as with one seed.
    one, three = paper(), paper()
    three["evaluation"]["seeds"] = [0, 1, 2]
    costs = [cost.totals(cost.plan_costs(validate_config(c), "h100")) for c in (one, three)]
    counts = {j.rule: j.count for j in cost.plan_costs(validate_config(three), "h100") if j.job == "lm_eval qwen3_8b aime24"}
    assert counts == {"lm_eval": 3}
    assert costs[1]["evaluation"] == pytest.approx(3 * costs[0]["evaluation"])
    assert costs[1]["training"] == pytest.approx(costs[0]["training"])


def test_per_model_evaluation_is_one_lm_eval_job_per_model_over_every_benchmark():
    config = paper()
    config["evaluation"]["jobs"] = "per_model"
    per_task = [j for j in cost.plan_costs(validate_config(paper()), "h100") if j.rule == "lm_eval"]
    per_model = [j for j in cost.plan_costs(validate_config(config), "h100") if j.rule == "lm_eval"]
    assert (len(per_task), len(per_model)) == (21, 3)  # 3 models x 7 benchmarks, then 3 models
    for job in per_model:  # a job decodes every benchmark's problems: the sum of its model's per-task jobs
        model = job.job.split()[1]
        mine = [j for j in per_task if j.job.split()[1] == model]
        assert job.notes["sequences"] == sum(j.notes["sequences"] for j in mine)


def test_a_served_teacher_is_timed_on_its_gpus_and_billed_on_its_own_row():
    config = validate_config(paper())
    served = copy.deepcopy(config)
    served["train"]["teacher_placement"] = "server"  # issue 23's value; the schema of this branch lacks it
    a = cost.assumptions(config, "h100")
    S, T = (plan.model_shape(config, n)[0] for n in ("qwen3_1p7b", "qwen3_8b"))
    here = cost.train_job(config, ("qwen3_8b", "qwen3_1p7b"), S, T, a, 1)
    there = cost.train_job(served, ("qwen3_8b", "qwen3_1p7b"), S, T, a, 1)
    assert (here.gpus, there.gpus) == (2, 2)
    scoring = [next(p for p in job.phases if p.name == "teacher scoring") for job in (here, there)]
    assert scoring[1].seconds == pytest.approx(2 * scoring[0].seconds)  # both ranks' sequences on one server GPU
    rows = {j.job: j for j in cost.plan_costs(served, "h100") if j.rule == "serve_teacher"}
    assert set(rows) == {"serve_teacher qwen3_8b", "serve_teacher qwen3_4b"}
    # busy time of the 8B server: 306 runs x 200 steps x 2 ranks (1.7B student) + 306 x 200 x 4 (4B student)
    jobs = {j.job: j for j in cost.plan_costs(served, "h100")}
    per_rank = {s: next(p.flops for p in jobs[f"train qwen3_8b -> {s}"].phases if p.name == "teacher scoring")
                for s in ("qwen3_1p7b", "qwen3_4b")}
    busy = (306 * 200 * 2 * per_rank["qwen3_1p7b"] + 306 * 200 * 4 * per_rank["qwen3_4b"]) / (989.4e12 * 0.4) / 3600
    assert rows["serve_teacher qwen3_8b"].gpu_hours == pytest.approx(busy)
    assert not [j for j in cost.plan_costs(config, "h100") if j.rule == "serve_teacher"]


def test_plan_cli_prints_every_job_and_the_totals(capsys):
    text = plan.main(["--configfile", str(REPO / "config/paper.yaml"), "--gpu", "h100"])
    jobs = cost.plan_costs(validate_config(paper()), "h100")
    for j in jobs:
        assert f"| {j.job} | {j.count} | {j.gpus} | **per" in text
    assert "| **total** |" in text and "Biggest drivers:" in text and "rollout decode" in text
    out = json.loads(plan.main(["--configfile", str(REPO / "config/paper.yaml"), "--gpu", "h200", "--json"]))
    assert out["cost"]["gpu"]["name"] == "h200" and len(out["cost"]["jobs"]) == len(jobs)
    assert out["cost"]["totals"]["total"] == pytest.approx(sum(j["gpu_hours"] for j in out["cost"]["jobs"]))
    assert {m["job"] for m in out["memory"]} >= {"train qwen3_8b -> qwen3_1p7b"}


def test_the_miniature_study_costs_through_the_hf_paths():
    from opd.studies import sweep
    from opd.studies.validate import load

    config = validate_config(load([REPO / "config" / "config.yaml"]))
    jobs = cost.plan_costs(config, "a100")
    assert all(j.seconds > 0 for j in jobs)
    runs = len(sweep.runs(config["models"], config["train"]))
    assert sum(j.count for j in jobs if j.rule == "train_opd") == runs
    assert sum(j.count for j in jobs if j.rule == "eval_trained") == runs
    evals = sum(j.count for j in jobs if j.rule == "lm_eval")
    assert config["evaluation"]["jobs"] == "per_model"  # one lm_eval job per base model
    assert evals == len(config["evaluation"]["models"] or config["models"])


def test_a_hub_model_without_shape_stops_the_estimate_naming_it(tmp_path):
    config = paper(gpu_type="h100")
    config["results_dir"] = str(tmp_path)
    del config["models"]["qwen3_4b"]["shape"]
    config["models"]["qwen3_4b"]["hub"] = "example/not-in-the-shape-table"  # opd.studies.hub_shapes knows Qwen3-4B
    with pytest.raises(ConfigError, match=r"models.qwen3_4b: no .*config.json and no models.qwen3_4b.shape keys .*: "
                                          r"the memory and cost planners need the model's shape"):
        validate_config(config, checks=[cost.config_problems])
