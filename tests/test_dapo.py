"""opd.worlds.paper.dapo on small hand-built files: dedupe counts, normalisation, conflicts, errors (all offline)."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd.worlds.paper import dapo
from opd.infra.io import DataFileError, read_jsonl

PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
          "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def wrap(problem):
    return PREFIX + problem + SUFFIX


def row(prompt, answer, index="x"):
    return {"data_source": "math_dapo", "prompt": [{"content": prompt, "role": "user"}], "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


# Ten rows, four distinct problems after normalisation (worked out by hand):
#   A "What is 1+2?"  rows 0, 2 (exact copy), 3 (other whitespace), 8 (full-width digits), 9 (no wrapper)
#   B "Compute 2+3."  rows 1, 6
#   C "Find x."       rows 4 (answer 7), 5 (answer 8): a conflict
#   a "what is 1+2?"  row 7: case is kept, so it is not A
ROWS = [
    row(wrap("What is 1+2?"), "3"),
    row(wrap("Compute 2+3."), "5"),
    row(wrap("What is 1+2?"), "3"),
    row(wrap("What  is\n1+2? "), "3"),
    row(wrap("Find x."), "7"),
    row(wrap("Find x."), "8"),
    row(wrap("Compute 2+3."), " 5 "),
    row(wrap("what is 1+2?"), "3"),
    row(wrap("What is \uff11+\uff12?"), "3"),
    row("What is 1+2?", "3"),
]


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def run(source, tmp_path, **kw):
    args = {"revision": "main", "out": tmp_path / "out" / "train_prompts.jsonl",
            "stats_path": tmp_path / "out" / "stats.json", "prompt_column": "prompt",
            "answer_column": "reward_model.ground_truth", "style": "boxed", "on_conflict": "drop", **kw}
    return dapo.prepare(source, **args), args["out"]


def test_strip_wrapper_and_normalize():
    assert dapo.strip_wrapper(wrap("Find $x$.")) == "Find $x$."
    assert dapo.strip_wrapper("  Find $x$.\n") == "Find $x$."
    assert dapo.normalize(wrap("Find  $x$\n\n if\tx=1.")) == "Find $x$ if x=1."
    assert dapo.normalize("x\u00a0=\uff11") == "x =1"  # NFKC: no-break space and full-width digit
    assert dapo.normalize("Find X.") != dapo.normalize("Find x.")


def test_make_question_styles():
    raw = wrap("Find $x$.")
    assert dapo.make_question(raw, "boxed") == "Find $x$.\n" + dapo.BOXED_INSTRUCTION
    assert dapo.make_question(raw, "plain") == "Find $x$."
    assert dapo.make_question(raw, "dapo") == raw
    with pytest.raises(ValueError, match="unknown prompt style"):
        dapo.make_question(raw, "chatty")


def test_dedupe_counts_by_hand(parquet, tmp_path):
    stats, out = run(parquet, tmp_path)
    assert stats["rows_read"] == 10
    assert stats["unique_prompts"] == 4
    assert stats["duplicate_rows"] == 6
    assert stats["copies_per_prompt"] == {"min": 1, "max": 5}
    assert stats["conflicting_prompts"] == 1 and stats["dropped_conflicting_prompts"] == 1
    assert stats["written"] == 3
    assert stats["conflicts"][0]["answers"] == {"7": 1, "8": 1}
    assert stats["conflicts"][0]["source_row"] == 4
    records = read_jsonl(out, required=("id", "question", "answer"))
    # First occurrence, source order; ids number the unique prompts, so dropped C leaves a gap.
    assert [r["id"] for r in records] == ["dapo-00000", "dapo-00001", "dapo-00003"]
    assert [r["problem"] for r in records] == ["What is 1+2?", "Compute 2+3.", "what is 1+2?"]
    assert [r["answer"] for r in records] == ["3", "5", "3"]
    assert [r["source_row"] for r in records] == [0, 1, 7]
    assert all(r["task"] == "dapo_math" for r in records)
    assert records[0]["question"] == "What is 1+2?\n" + dapo.BOXED_INSTRUCTION
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_conflict_policies(parquet, tmp_path):
    stats, out = run(parquet, tmp_path, on_conflict="first")
    assert stats["written"] == 4 and stats["conflicting_prompts"] == 1
    assert read_jsonl(out)[2] == {"id": "dapo-00002", "task": "dapo_math", "answer": "7", "problem": "Find x.",
                                  "question": "Find x.\n" + dapo.BOXED_INSTRUCTION, "source_row": 4}
    with pytest.raises(DataFileError, match=r"1 prompt\(s\) have conflicting answers.*source row 4"):
        run(parquet, tmp_path, on_conflict="error")


def test_deterministic(parquet, tmp_path):
    _, out = run(parquet, tmp_path / "a")
    _, out2 = run(parquet, tmp_path / "b")
    assert out.read_bytes() == out2.read_bytes()


def test_jsonl_with_flat_columns(tmp_path):
    """A re-exported copy (prompt as a string, answer in its own column) works through the column flags."""
    path = tmp_path / "flat.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "solution": a}) + "\n"
                            for p, a in [("Find x.", "1"), ("Find  x.", "1"), ("Find y.", "2")]))
    stats, out = run(path, tmp_path, answer_column="solution", style="plain")
    assert (stats["rows_read"], stats["unique_prompts"], stats["written"]) == (3, 2, 2)
    assert [r["question"] for r in read_jsonl(out)] == ["Find x.", "Find y."]


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"content": "Find x.", "role": "user"}], "answer": "1"}]), path)
    with pytest.raises(DataFileError) as err:
        run(path, tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and "'reward_model.ground_truth'" in msg and "answer" in msg


def test_empty_files(tmp_path):
    empty_pq = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:1]).slice(0, 0), empty_pq)
    with pytest.raises(DataFileError, match=f"{empty_pq}: no rows"):
        run(empty_pq, tmp_path)
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n")
    with pytest.raises(DataFileError, match=f"{empty_jsonl}: no rows"):
        run(empty_jsonl, tmp_path)


def test_bad_cells_and_files(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "system", "content": "hi"}], "reward_model": {"ground_truth": "1"}}))
    with pytest.raises(DataFileError, match="row 1: column 'prompt' holds no user message"):
        run(path, tmp_path)
    path.write_text(json.dumps({"prompt": "Find x.", "reward_model": {"ground_truth": " "}}))
    with pytest.raises(DataFileError, match="row 1: column 'reward_model.ground_truth' is empty"):
        run(path, tmp_path)
    with pytest.raises(DataFileError, match="data file not found"):
        run(tmp_path / "missing.parquet", tmp_path)
    csv = tmp_path / "dapo.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataFileError, match="unsupported file type '.csv'"):
        run(csv, tmp_path)


def test_hub_path_resolves_revision_to_commit(monkeypatch, tmp_path):
    """The hub path, with the hub replaced: the branch is resolved to a commit and that commit is loaded."""
    import datasets
    import huggingface_hub

    seen = {}

    class FakeApi:
        def dataset_info(self, repo_id, revision):
            seen["info"] = (repo_id, revision)
            return type("Info", (), {"sha": "a" * 40})()

    def fake_load(path, split, revision):
        seen["load"] = (path, split, revision)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    stats, _ = run(None, tmp_path, revision="main")
    assert seen == {"info": (dapo.HUB_ID, "main"), "load": (dapo.HUB_ID, "train", "a" * 40)}
    assert stats["revision"] == "a" * 40 and stats["source"] == f"{dapo.HUB_ID}@{'a' * 40}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    dapo.main(["--dataset", "someone/DAPO-copy", "--revision", "v1", "--out", str(tmp_path / "p.jsonl")])
    assert seen == {"info": ("someone/DAPO-copy", "v1"), "load": ("someone/DAPO-copy", "train", "a" * 40)}
    assert (stats["rows_read"], stats["unique_prompts"], stats["written"]) == (10, 4, 3)


def test_main_writes_prompts_and_stats(parquet, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "data" / "train_prompts.jsonl"
    dapo.main(["--source", str(parquet), "--out", str(out)])
    stats = json.loads((tmp_path / "data" / "train_prompts.stats.json").read_text())
    assert stats["written"] == 3 and len(read_jsonl(out)) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unique_prompts"] == 4
    assert "1 prompt(s) with conflicting answers" in captured.err


def test_import_downloads_nothing(repo):
    code = "import sys, opd.worlds.paper.dapo; print(any(m in sys.modules for m in ('datasets', 'huggingface_hub')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"
