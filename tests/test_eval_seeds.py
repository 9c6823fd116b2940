"""Evaluation seeds (config evaluation.seeds): where each seed's files go, how lm-eval is seeded, a problem's
mean over seeds in the statistics, mean ± std over seeds in the tables; worked out by hand."""

import json

import pytest

from opd.infra.lmeval_results import eval_seed_dir
from opd.studies import eval_seeds, evaluate, report, report_stats
from conftest import write_eval

ARGS = report.argparse.Namespace(level=0.95, n_boot=2000)


def test_seed_dirs_and_lm_eval_seeds(tmp_path):
    assert eval_seed_dir(tmp_path, 0) == tmp_path  # seed 0: the files of a study without evaluation seeds
    assert eval_seed_dir(tmp_path, 3) == tmp_path / "evalseed~3"
    # the workflow's strings stay strings, wildcards and "./" kept, so they match the rules' outputs exactly
    assert eval_seed_dir("./out/eval/{model}", 2) == "./out/eval/{model}/evalseed~2"
    assert eval_seed_dir("./out/eval/{model}", 0) == "./out/eval/{model}"
    # Seed 0 = lm-eval's own defaults (so today's numbers stay); seed s adds s; vLLM's sampling seed too.
    assert evaluate.seed_args(0, "hf") == ({"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234}, {})
    assert evaluate.seed_args(0, "vllm")[1] == {}
    assert evaluate.seed_args(2, "vllm") == ({"random_seed": 2, "numpy_random_seed": 1236, "torch_random_seed": 1236},
                                             {"seed": 1236})


def _two_seeds(d):
    """100 problems: seed 0 solves the first 50, seed 1 the first 70."""
    write_eval(eval_seed_dir(d, 0), {"arith1": [1] * 50 + [0] * 50})
    write_eval(eval_seed_dir(d, 1), {"arith1": [1] * 70 + [0] * 30})


def test_problem_mean_over_seeds_and_its_interval(tmp_path):
    _two_seeds(tmp_path / "m")
    means, acc = eval_seeds.read_problem_means(tmp_path / "m", "arith1", "exact_match,strict-match", [0, 1])
    assert acc == {0: 0.5, 1: 0.7}
    assert [means[f"{i}:h{i}"] for i in (0, 60, 80)] == [1.0, 0.5, 0.0]
    scores, seed_scores = report_stats.load_evals([("m", 0, tmp_path / "m")], ["arith1"], {}, [0, 1])
    e = report_stats.estimates(scores, {"arith1": ["arith1"]}, ARGS)["m"]["arith1"]
    # 50 problems at 1, 20 at 0.5, 30 at 0: mean 0.6; sd = sqrt(0.55 - 0.36) = 0.436, SE 0.0436 -> ±8.5 points
    # (one seed alone, 0/1 per problem: sd 0.5 -> ±9.8; the seeds' mean narrows the interval).
    assert e.mean == pytest.approx(0.6)
    assert (e.hi - e.lo) / 2 == pytest.approx(0.0854, rel=0.12)
    # Mean ± std over the seeds as TA-OPD prints it: 60.0 ± 14.1 (std of 50 and 70, n - 1).
    s = eval_seeds.spread(seed_scores, "m", ["arith1"])
    assert (s.mean, s.std, s.n) == (pytest.approx(0.6), pytest.approx(0.141421, rel=1e-4), 2)
    assert eval_seeds.text(s) == "60.0 ± 14.1"
    assert report_stats.cell(e, s) == f"60.0 [{100 * e.lo:.1f}, {100 * e.hi:.1f}] (60.0 ± 14.1)"
    assert eval_seeds.mlflow_metrics("", seed_scores) == {"m.arith1.eval_seed_0": pytest.approx(50.0),
                                                          "m.arith1.eval_seed_1": pytest.approx(70.0),
                                                          "m.arith1.eval_seed_mean": pytest.approx(60.0)}


def test_one_seed_is_todays_table(tmp_path):
    write_eval(tmp_path / "m", {"arith1": [1] * 80 + [0] * 20})
    scores, seed_scores = report_stats.load_evals([("m", 0, tmp_path / "m")], ["arith1"], {})
    s = eval_seeds.spread(seed_scores, "m", ["arith1"])
    assert s.n == 1 and eval_seeds.text(s) == "" and eval_seeds.mlflow_metrics("", seed_scores) == {}
    e = report_stats.estimates(scores, {"arith1": ["arith1"]}, ARGS)["m"]["arith1"]
    assert report_stats.cell(e, s) == report_stats.cell(e)


def test_training_seeds_then_tasks_in_the_spread(tmp_path):
    """Per evaluation seed: training seeds averaged, then the column's tasks; then mean ± std over seeds."""
    for train_seed, (a0, a1) in enumerate([(0.4, 0.6), (0.6, 1.0)]):
        d = tmp_path / f"run{train_seed}"
        write_eval(eval_seed_dir(d, 0), {"t1": [1] * int(10 * a0) + [0] * (10 - int(10 * a0)), "t2": [1] * 10})
        write_eval(eval_seed_dir(d, 5), {"t1": [1] * int(10 * a1) + [0] * (10 - int(10 * a1)), "t2": [0] * 10})
    _, seed_scores = report_stats.load_evals([("r", 0, tmp_path / "run0"), ("r", 1, tmp_path / "run1")],
                                             ["t1", "t2"], {}, [0, 5])
    # seed 0: t1 (0.4 + 0.6) / 2 = 0.5, t2 1 -> 0.75; seed 5: t1 0.8, t2 0 -> 0.4; mean 0.575, std 0.2475
    s = eval_seeds.spread(seed_scores, "r", ["t1", "t2"])
    assert s.mean == pytest.approx(0.575) and s.std == pytest.approx(0.24749, rel=1e-4)


def test_seeds_on_different_problems_refused(tmp_path):
    write_eval(eval_seed_dir(tmp_path, 0), {"arith1": [1, 0, 1]})
    write_eval(eval_seed_dir(tmp_path, 2), {"arith1": [1, 0, 1]}, offset=1)
    with pytest.raises(ValueError, match=r"evalseed~2/arith1.samples.jsonl and .*: evaluation seeds 0 and 2 "
                                         r"scored different problems \(3 vs 3, 2 shared\)"):
        eval_seeds.read_problem_means(tmp_path, "arith1", "exact_match,strict-match", [0, 2])


def test_models_table_shows_the_spread(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    _two_seeds(tmp_path / "eval" / "m")
    out = tmp_path / "report"
    report.main(["--results-dir", str(tmp_path / "eval"), "--models", "m", "--tasks", "arith1", "--ood-tasks",
                 "--eval-seeds", "0", "1", "--out-md", str(out / "models.md"), "--out-csv", str(out / "models.csv"),
                 "--out-png", str(out / "models.png"), "--study", "t"])
    assert "(60.0 ± 14.1)" in (out / "models.md").read_text()


@pytest.mark.parametrize("seeds, message", [([], "evaluation.seeds: [] should be non-empty"),
                                            ([0, 1, 1], "evaluation.seeds: [0, 1, 1] has non-unique elements")])
def test_bad_seeds_refused_naming_the_key(repo, seeds, message):
    from opd.infra.config import ConfigError, load_yaml, validate_config

    config = load_yaml(repo / "config/config.yaml")
    config["evaluation"]["seeds"] = seeds
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(config)


@pytest.mark.slow
def test_seeds_change_sampled_responses_not_greedy_ones(tiny_world, tmp_path, repo):
    """The tiny random student on 6 problems: under sampling two seeds give different responses, under
    greedy decoding identical ones (lm-eval's hf backend, seeded by opd.studies.evaluate.seed_args)."""
    from opd.infra.io import write_jsonl
    from opd.worlds.miniature import generator as toy

    write_jsonl(tmp_path / "data" / "arith1.jsonl", toy.generate("arith1", 6, seed=0, split="bench"))

    def responses(seed, gen_kwargs):
        result = evaluate.run_lm_eval(tiny_world["student"], ["arith1"], repo / "workflow/tasks", "hf", 6, 12, None,
                                      "cpu", gen_kwargs=gen_kwargs, data_root=tmp_path, eval_seed=seed)
        return [s["resps"][0][0] for s in result["samples"]["arith1"]]

    sampling = {"do_sample": True, "temperature": 1.0, "until": ["Question:"]}
    greedy = {"do_sample": False, "until": ["Question:"]}
    assert responses(0, sampling) != responses(1, sampling)
    assert responses(0, greedy) == responses(1, greedy)
    assert json.dumps(responses(1, sampling)) == json.dumps(responses(1, sampling))  # a seed repeats itself
