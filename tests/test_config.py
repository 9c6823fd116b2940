import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from opd import worlds
from opd.infra.config import ConfigError
from opd.infra.config import validate_config as _validate
from opd.studies.validate import merge


def validate_config(cfg: dict) -> dict:
    """The Snakefile's validation: the schema, then the world's checks."""
    return _validate(cfg, checks=[worlds.config_problems])


@pytest.fixture
def cfg(repo: Path) -> dict:
    return yaml.safe_load((repo / "config/config.yaml").read_text())


def test_shipped_configs_are_valid(repo: Path, cfg):
    validate_config(copy.deepcopy(cfg))
    validate_config(yaml.safe_load((repo / "tests/config/smoke.yaml").read_text()))
    for overlay in ("full_methods", "sweep", "builds"):
        merged = merge(copy.deepcopy(cfg), yaml.safe_load((repo / f"config/{overlay}.yaml").read_text()))
        assert merged["models"] == cfg["models"] and merged["study"] == f"miniature_{overlay}"
        validate_config(merged)


def test_defaults_are_filled(cfg):
    cfg.pop("evaluation", None)
    out = validate_config(cfg)
    assert out["evaluation"]["benchmarks"] == ["arith1", "arith2", "arith3", "arith4", "arith5", "reverse"]
    assert out["evaluation"]["limit"] is None


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return str(info.value)


def test_unknown_key_named_with_allowed_keys(cfg):
    cfg["world"]["n_benchh"] = 3
    msg = _error(cfg)
    assert "'n_benchh'" in msg and "under 'world'" in msg and "n_bench" in msg and "max_value" in msg


def test_unknown_top_level_key(cfg):
    cfg["modles"] = {}
    assert "unknown key(s) 'modles' at the top level" in _error(cfg)


def test_wrong_type_named(cfg):
    cfg["models"]["teacher"]["steps"] = "many"
    assert "models.teacher.steps: expected integer, got 'many'" in _error(cfg)


def test_out_of_range_named_with_bounds(cfg):
    cfg["world"]["ood_fraction"] = 1.5
    assert "world.ood_fraction: 1.5 is out of range; allowed: [0, 1]" in _error(cfg)
    cfg = copy.deepcopy(cfg)
    cfg["world"]["ood_fraction"] = 0.1
    cfg["models"]["teacher"]["lr"] = 0
    assert "models.teacher.lr: 0 is out of range; allowed: (0, 1]" in _error(cfg)


def test_unknown_benchmark_lists_allowed(cfg):
    cfg["evaluation"]["benchmarks"] = ["arith1", "math500", "reverse"]
    msg = _error(cfg)
    assert "evaluation.benchmarks[1]: 'math500' is not a task of world 'miniature'; allowed values" in msg
    assert "'arith5'" in msg and "'reverse'" in msg


def test_unknown_model_name(cfg):
    cfg["evaluation"]["models"] = ["teacher", "student_xl"]
    msg = _error(cfg)
    assert "evaluation.models[1]: unknown model 'student_xl'" in msg and "'student_s'" in msg


def test_bad_model_name_and_role(cfg):
    cfg["models"]["bad-name"] = cfg["models"]["teacher"]
    assert "unknown key(s) 'bad-name' under 'models'" in _error(cfg)
    cfg = copy.deepcopy(cfg)
    del cfg["models"]["bad-name"]
    cfg["models"]["teacher"]["role"] = "student"
    assert "exactly one model needs role 'teacher'" in _error(cfg)


def test_snakemake_refuses_bad_config_before_any_job(repo: Path, tmp_path: Path, cfg, python):
    cfg["world"]["n_bench"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [python, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(bad), "--cores", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "world.n_bench: -1 is out of range; allowed: [1, 10000]" in out
    assert not (tmp_path / "results").exists()  # nothing ran


def _schema_keys(schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        keys.add(name)
        keys |= _schema_keys(sub)
    for sub in schema.get("patternProperties", {}).values():
        keys |= _schema_keys(sub)
    return keys


def test_every_schema_key_is_documented(repo: Path):
    schema = yaml.safe_load((repo / "workflow/schemas/config.schema.yaml").read_text())
    doc = (repo / "config/README.md").read_text()
    missing = [k for k in _schema_keys(schema) if f"`{k}`" not in doc and f".{k}`" not in doc]
    assert not missing, f"config/README.md does not document: {missing}"


def test_train_students_must_be_students(cfg):
    cfg["train"]["students"] = ["teacher"]
    assert "train.students[0]: 'teacher' is not a student" in _error(cfg)


def test_unknown_method_and_bad_ratio_refused(cfg):
    cfg["train"]["methods"] = ["full", "magic"]
    cfg["train"]["ratio"] = [0.1, 1.5]
    msg = _error(cfg)
    assert "train.methods[1]: 'magic' is not allowed" in msg and "'release+ta_opd'" in msg
    assert "train.ratio[1]: 1.5 is out of range; allowed: (0, 1]" in msg
    cfg["train"]["methods"], cfg["train"]["ratio"], cfg["train"]["top_k"] = ["full"], [0.1], [16, 1]
    assert "train.top_k[1]: 1 is out of range; allowed: [2, 1024]" in _error(cfg)


@pytest.mark.parametrize("key,value,expected", [
    ("ratio", [], "train.ratio: [] should be non-empty"),
    ("top_k", [], "train.top_k: [] should be non-empty"),
    ("seeds", [], "train.seeds: [] should be non-empty"),
    ("methods", [], "train.methods: [] should be non-empty"),
    ("ratio", [0.1, 0.1], "train.ratio: [0.1, 0.1] has non-unique elements"),
    ("top_k", [8, 16, 8], "train.top_k: [8, 16, 8] has non-unique elements"),
    ("ratio", [0.0], "train.ratio[0]: 0.0 is out of range; allowed: (0, 1]"),
    ("ratio", [0.1, 0.1000000001], "train.ratio: values [0.1, 0.1000000001] are not distinct once written"),
    ("ratio", 0.1, "train.ratio: expected array, got 0.1"),
])
def test_bad_grids_refused(cfg, key, value, expected):
    cfg["train"][key] = value
    assert expected in _error(cfg)


def test_pairs_must_name_defined_distinct_models(cfg):
    cfg["train"]["pairs"] = [{"teacher": "teacher", "student": "nope"}, {"teacher": "student_s", "student": "student_s"}]
    msg = _error(cfg)
    assert "train.pairs[0].student: unknown model 'nope'" in msg
    assert "train.pairs[1]: teacher and student are both 'student_s'" in msg


def test_ood_benchmarks_must_be_benchmarks(cfg):
    cfg["evaluation"]["ood_benchmarks"] = ["gpqa"]
    assert "evaluation.ood_benchmarks: 'gpqa' is not in evaluation.benchmarks" in _error(cfg)


def test_partial_resources_keep_defaults(cfg):

    cfg["resources"] = {"train": {"gpu": 1}}
    out = validate_config(cfg)
    assert out["resources"]["train"] == {"gpu": 1, "mem_mb": 4000, "runtime": 120}
    assert out["resources"]["eval"]["gpu"] == 0
