"""benchmarks/recipe_probe.py: greedy accuracy with the world's checker, and a 1-step run through the trainer."""

import json

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def probe():
    return load_benchmark("recipe_probe")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_world):
    """The six benchmarks (3 problems each) and training prompts, models laid out as `results/models`."""
    from opd.worlds.miniature import generator as toy

    root = tmp_path_factory.mktemp("probe_world")
    toy.build_world(root / "data", n_bench=3, n_sft=10, n_prompts=8, seed=0, ood_fraction=0.2)
    (root / "models").mkdir()
    for name in ("teacher", "student"):
        (root / "models" / name).symlink_to(tiny_world[name])
    return root


def test_greedy_accuracy_checks_answers_with_the_world(probe, world, monkeypatch):
    from opd.engines import rollout

    data = world / "data"
    answers = {t: [json.loads(line)["answer"] for line in (data / f"{t}.jsonl").open()] for t in probe.WORLD.benchmarks}

    def scripted(model, tok, prompts, K, temperature, top_p, max_new_tokens, seed, batch_size):
        # the right answer to the first two problems of each task, a wrong one to the third
        task = probe.WORLD.benchmarks[scripted.calls]  # greedy_accuracy decodes the tasks in this order
        scripted.calls += 1
        texts = [f" The answer is {a}." for a in answers[task][:2]] + [" The answer is 999."]
        responses = [tok(t)["input_ids"] for t in texts]
        n = [len(r) for r in responses]
        flat = [x for r in responses for x in r]
        return {"offsets_B1": torch.tensor([0, *n]).cumsum(0), "tokens_N": torch.tensor(flat, dtype=torch.int32),
                "s_logprob_N": torch.zeros(len(flat)), "s_topk_ids_NK": torch.zeros(len(flat), K, dtype=torch.int32),
                "s_topk_logprobs_NK": torch.zeros(len(flat), K),
                "prompt_offsets_B1": torch.tensor([0, *map(len, prompts)]).cumsum(0),
                "prompt_tokens_P": torch.tensor([x for p in prompts for x in p], dtype=torch.int32)}

    scripted.calls = 0
    monkeypatch.setattr(rollout, "generate_hf", scripted)
    acc = probe.greedy_accuracy(world / "models" / "student", data)
    assert acc == pytest.approx({**{t: 200 / 3 for t in probe.WORLD.benchmarks}, "in_domain": 200 / 3})


def test_one_step_run_through_the_trainer(probe, world, capsys):
    probe.main(["--student", "student", "--models", str(world / "models"), "--data", str(world / "data"),
                "--seeds", "0", "--out-root", str(world / "probe"), "--name", "tiny", "--",
                "--method", "full", "--steps", "1", "--prompts-per-step", "2", "--samples", "1",
                "--max-new-tokens", "8", "--loss", "topk_forward_kl"])
    out = capsys.readouterr().out
    assert (world / "probe/tiny/seed~0/model/model.safetensors").is_file()
    assert json.loads((world / "probe/tiny/seed~0/metrics.json").read_text())["step"] == 1
    assert "tiny: in-domain" in out and "over 1 seed(s)" in out and "--loss topk_forward_kl" in out
