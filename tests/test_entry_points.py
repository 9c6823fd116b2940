"""Every `python -m opd.*` entry point refuses what the config schema refuses, with the schema's message."""

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from opd.infra import cli
from opd.infra.config import ConfigError, load_schema, validate_config

PATHS = ["--prompts", "p.jsonl", "--out-dir", "out", "--world", "miniature"]
TRAIN = ["--student", "s", "--teacher", "t", "--method", "full", *PATHS]
ROLLOUT = ["--model-dir", "m", "--prompts", "p.jsonl", "--out", "r.safetensors", "--world", "miniature"]
SCORE = ["--rollouts", "r.safetensors", "--teacher", "t", "--out", "s.safetensors"]
FIXED = ["--rollouts", "r", "--scores", "s", "--student", "s", "--teacher", "t", "--out", "o.csv"]
DIAGNOSE = ["--students", "a", "--rollouts", "r", "--scores", "s", "--fixed-context", "f", "--tokenizer", "t",
            "--out-dir", "o"]
EVALUATE = ["--model-dir", "m", "--model-name", "m", "--tasks", "arith1", "--include-path", "t", "--out-dir", "o"]
SFT = ["--data", "d", "--tokenizer", "t", "--out-dir", "o", "--name", "n", "--hidden-size", "16", "--layers", "1",
       "--heads", "2", "--kv-heads", "1", "--intermediate-size", "32", "--steps", "1"]
GRID = ["--out-md", "a.md", "--out-csv", "a.csv", "--out-png", "a.png", "--pairs", "t:s", "--methods", "full",
        "--top-k", "4", "--ratios", "0.1", "--seeds", "0", "--tasks", "arith1", "--ood-tasks"]

# (module, its argv, the one message): each case is one of the bad inputs the issue saw accepted silently.
CASES = [
    ("opd.engines.train", [*TRAIN, "--temperature", "-1"],
     "invalid flag: --temperature: -1.0 is out of range; allowed: (0, 10] (config train.temperature)"),
    ("opd.engines.train", [*TRAIN, "--clip-eps=-0.2"],
     "invalid flag: --clip-eps: -0.2 is out of range; allowed: (0, 1] (config train.clip_eps)"),
    ("opd.engines.train", [*TRAIN, "--lr", "0"],
     "invalid flag: --lr: 0.0 is out of range; allowed: (0, 1] (config train.lr)"),
    ("opd.engines.train", [*TRAIN, "--lr", "-1e-4"],
     "invalid flag: --lr: -0.0001 is out of range; allowed: (0, 1] (config train.lr)"),
    ("opd.engines.train", [*TRAIN, "--top-p", "0"],
     "invalid flag: --top-p: 0.0 is out of range; allowed: (0, 1] (config train.top_p)"),
    ("opd.engines.train", [*TRAIN, "--lr", "nan"], "invalid flag: --lr: nan is not a finite number (config train.lr)"),
    ("opd.engines.rollout", [*ROLLOUT, "--top-k", "1"],
     "invalid flag: --top-k: 1 is out of range; allowed: [2, 1024] (config diagnose.top_k)"),
    ("opd.engines.rollout", [*ROLLOUT, "--samples", "0"],
     "invalid flag: --samples: 0 is out of range; allowed: [1, inf] (config diagnose.samples)"),
    ("opd.engines.score", [*SCORE, "--top-k", "1"],
     "invalid flag: --top-k: 1 is out of range; allowed: [2, 1024] (config diagnose.top_k)"),
    ("opd.studies.fixed_context", [*FIXED, "--ratio", "0"],
     "invalid flag: --ratio: 0.0 is out of range; allowed: (0, 1] (config diagnose.fixed_context.ratio)"),
    ("opd.studies.diagnose", [*DIAGNOSE, "--bins", "1"],
     "invalid flag: --bins: 1 is out of range; allowed: [2, 100] (config diagnose.bins)"),
    ("opd.studies.evaluate", [*EVALUATE, "--max-gen-toks", "4"],
     "invalid flag: --max-gen-toks: 4 is out of range; allowed: [8, 32768] (config evaluation.max_gen_toks)"),
    ("opd.studies.evaluate", [*EVALUATE, "--batch-size", "0"],
     "invalid flag: --batch-size: 0 is out of range; allowed: [1, inf] (config evaluation.batch_size)"),
    ("opd.worlds.miniature.sft", [*SFT, "--lr", "-3e-3"],
     "invalid flag: --lr: -0.003 is out of range; allowed: (0, 1] (config models.*.lr)"),
    ("opd.worlds.miniature.generator", ["--out-dir", "o", "--ood-fraction", "1.5"],
     "invalid flag: --ood-fraction: 1.5 is out of range; allowed: [0, 1] (config world.ood_fraction)"),
    ("opd.worlds.miniature.tokenizer", ["--corpus", "c", "--out-dir", "o", "--vocab-size", "100"],
     "invalid flag: --vocab-size: 100 is out of range; allowed: [300, 65536] (config world.vocab_size)"),
    ("opd.infra.fetch", ["--repo", "Qwen3", "--out-dir", "o", "--name", "n"],
     "invalid flag: --repo: 'Qwen3' does not match '^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$' (config models.*.hub)"),
    ("opd.studies.report_train", [*GRID, "--ratios", "0.1", "0"],
     "invalid flag: --ratios[1]: 0.0 is out of range; allowed: (0, 1] (config train.ratio)"),
    ("opd.engines.train", [*TRAIN, "--threads", "0", "--study", "a b"],
     "invalid flags: --threads: 0 is out of range; allowed: [1, 64] (config threads); "
     "--study: 'a b' does not match '^[A-Za-z0-9_.-]+$' (config study)"),
]


@pytest.mark.parametrize("module, argv, message", CASES, ids=[f"{m.rsplit('.', 1)[1]}{a[-2:]}" for m, a, _ in CASES])
def test_entry_point_refuses_what_the_schema_refuses(module, argv, message, tmp_path, monkeypatch):
    """Before anything is read or any model loads (the paths given do not even exist)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.FlagError) as err:
        importlib.import_module(module).main(argv)
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []


def test_flag_and_config_key_get_the_same_message():
    with pytest.raises(ConfigError) as config_err:
        validate_config({"models": {"t": {"role": "teacher", "hub": "a/b"}, "s": {"role": "student", "hub": "a/c"}},
                         "train": {"lr": -1e-4}})
    with pytest.raises(cli.FlagError) as flag_err:
        cli.check_flags(argparse.Namespace(lr=-1e-4), {"lr": "train.lr"})
    assert "train.lr: -0.0001 is out of range; allowed: (0, 1]" in str(config_err.value)
    assert str(flag_err.value) == "invalid flag: --lr: -0.0001 is out of range; allowed: (0, 1] (config train.lr)"


def test_negative_numbers_parse_as_values():
    plain, ours = argparse.ArgumentParser(), cli.ArgumentParser()
    for parser in (plain, ours):
        parser.add_argument("--lr", type=float)
        parser.add_argument("--shift", type=int)
    if sys.version_info < (3, 13):  # argparse's own pattern misses exponents there
        with pytest.raises(SystemExit):
            plain.parse_args(["--lr", "-1e-4"])
    args = ours.parse_args(["--lr", "-1e-4", "--shift", "-3"])
    assert (args.lr, args.shift) == (-1e-4, -3)
    assert ours.parse_args(["--lr", "-.5E+2"]).lr == -50.0


@pytest.mark.parametrize("module", ["opd.engines.train", "opd.engines.rollout", "opd.engines.score",
                                    "opd.studies.fixed_context", "opd.studies.diagnose", "opd.studies.evaluate",
                                    "opd.worlds.miniature.sft", "opd.worlds.miniature.generator"])
def test_every_table_key_is_in_the_schema(module):
    schema = load_schema()
    for dest, key in importlib.import_module(module).FLAGS.items():
        sub = key if isinstance(key, dict) else cli.subschema(schema, key)
        assert "type" in sub or "enum" in sub, (dest, key)


def test_train_defaults_pass_the_schema():
    from opd.engines import train

    args = train.parse_args(TRAIN)
    flags = {**cli.COMMON, **cli.section_flags(args, "train"), **train.FLAGS}
    assert "clip_eps" in flags and "keep_checkpoints" in flags  # found by name in config `train`
    assert cli.flag_problems(args, flags) == []


def test_a_bad_flag_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opd.engines.train", *TRAIN, "--lr", "-1e-4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("opd.engines.train: error: invalid flag: --lr: -0.0001 is out of range; "
                                   "allowed: (0, 1] (config train.lr)")


def _help(module: str) -> dict[str, str]:
    """flag -> its entry of `--help`, continuation lines joined."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "1000"})
    assert proc.returncode == 0, proc.stderr
    entries: dict[str, str] = {}
    flag = None
    for line in proc.stdout.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            flag = next((f for f in line.replace(",", " ").split() if f.startswith("--")), flag)
            entries[flag] = " ".join(line.split())
        elif flag and line.startswith("    "):
            entries[flag] += " " + " ".join(line.split())
    return entries


def test_training_help_says_what_the_checks_allow_and_top_p_is_a_train_key():
    entries = _help("opd.engines.train")
    assert "0 = greedy" not in " ".join(entries.values())  # the help said so, the check refused 0
    assert entries["--temperature"] == ("--temperature TEMPERATURE sampling temperature of the rollouts "
                                        "(allowed: (0, 10]; config train.temperature)")
    assert entries["--top-p"] == "--top-p TOP_P nucleus sampling mass (allowed: (0, 1]; config train.top_p)"
    from opd.engines import train

    with pytest.raises(cli.FlagError) as err:
        train.check_args(train.parse_args([*TRAIN, "--top-p", "1.5"]))
    assert str(err.value) == "invalid flag: --top-p: 1.5 is out of range; allowed: (0, 1] (config train.top_p)"


@pytest.mark.parametrize("module, section", [("opd.engines.train", "train"), ("opd.engines.rollout", None),
                                             ("opd.studies.fixed_context", None), ("opd.studies.evaluate", None)])
def test_every_tabled_flag_documents_its_range_and_key_from_the_table(module, section):
    """The help's '(allowed: ...; config ...)' is built from the table the flags are checked with."""
    from opd.infra.config import allowed

    mod, schema, lines = importlib.import_module(module), load_schema(), _help(module)
    table = cli.flag_table([f.removeprefix("--").replace("-", "_") for f in lines], mod.FLAGS, section)
    checked = 0
    for dest, key in table.items():
        flag = cli.flag_name(dest)
        if flag not in lines:
            continue
        rule = allowed(key if isinstance(key, dict) else cli.subschema(schema, key))
        if rule:
            assert f"allowed: {rule}" in lines[flag], flag
            checked += 1
        if isinstance(key, str):
            assert f"config {key.removesuffix('[]')})" in lines[flag], flag
    assert checked >= 3
