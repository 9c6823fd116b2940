"""benchmarks/engine_cost.py runs end to end at a tiny scale (its ratios are measured, not asserted, except bytes)."""

import json

from conftest import load_benchmark


def test_engine_cost_prints_its_three_sections_and_one_json_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("OPD_VLLM_PYTHON", str(tmp_path / "no-python"))  # (b) must say why it is skipped
    bench = load_benchmark("engine_cost")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: type("P", (), {"returncode": 1, "stderr": "nope"}))
    bench.main(["--fraction", "0.01", "--steps", "3", "--train-flags",
                "--prompts-per-step 2 --samples 1 --max-new-tokens 8 --top-k 4"])
    out = capsys.readouterr().out
    row = json.loads(out.strip().splitlines()[-1])
    # one copy per node whatever the ranks: the byte ratios are exact
    assert row["push"]["ranks1"]["bytes_ratio"] == 1.0 and row["push"]["ranks2"]["bytes_ratio"] == 0.5
    assert row["rollout_logprobs"] == {"skipped": f"no vLLM importable by {tmp_path / 'no-python'} "
                                                  "(set OPD_VLLM_PYTHON): nope"}
    overlap = row["async_rollouts"]
    assert len(overlap["times_async0"]) == len(overlap["times_async1"]) == 3 and overlap["ratio"] > 0
    assert "(c) step s, async_rollouts 0 -> 1" in out and "(b) rollout time" in out and "skipped" in out
