"""The conda environments of `snakemake --sdm conda` (envs/*.yaml) pin what pyproject.toml pins."""

import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENVS = ("core", "vllm", "eval")
# vllm==0.33.0 forces these (torch==2.14.0; transformers>=5.16.1,<5.21.0; numpy<2.4 through mistral_common
# on Python <=3.12), so the environments that hold vLLM pin them differently from pyproject.toml; the env
# files say so in their header.
VLLM_FIXED = {"torch": "==2.14.0", "transformers": "==5.20.2", "numpy": "==2.3.5"}
EXCEPTIONS = {"core": {}, "vllm": VLLM_FIXED, "eval": VLLM_FIXED}


def pyproject_pins(repo) -> dict[str, Requirement]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def env_file(repo, name) -> dict:
    return yaml.safe_load((repo / "envs" / f"{name}.yaml").read_text())


def env_pins(repo, name) -> dict[str, Requirement]:
    deps = env_file(repo, name)["dependencies"]
    pip = [d["pip"] for d in deps if isinstance(d, dict)]
    assert len(pip) == 1, f"envs/{name}.yaml: expected one pip: block"
    return {canonicalize_name(r.name): r for r in map(Requirement, pip[0])}


@pytest.mark.parametrize("name", ENVS)
def test_shared_pins_equal_pyproject(repo, name):
    project, env = pyproject_pins(repo), env_pins(repo, name)
    for pkg, req in env.items():
        if pkg in EXCEPTIONS[name]:
            assert str(req.specifier) == EXCEPTIONS[name][pkg], f"envs/{name}.yaml: {pkg}"
            assert str(req.specifier) != str(project[pkg].specifier)  # else it is no exception: drop it
        elif pkg in project:
            assert str(req.specifier) == str(project[pkg].specifier), f"envs/{name}.yaml: {pkg} {req} vs {project[pkg]}"


@pytest.mark.parametrize("name", ENVS)
def test_every_pin_exact_and_python_in_range(repo, name):
    for pkg, req in env_pins(repo, name).items():
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"envs/{name}.yaml: {req}"
    pythons = [d for d in env_file(repo, name)["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"]  # pyproject: requires-python >=3.11,<3.13


def test_envs_hold_what_their_rules_need(repo):
    assert {"torch", "transformers", "lm-eval", "mlflow"} <= set(env_pins(repo, "core"))
    assert "vllm" not in env_pins(repo, "core")  # vLLM brings its own torch: a separate env
    assert {"vllm", "torch", "transformers", "mlflow", "ruptures"} <= set(env_pins(repo, "vllm"))
    ev = env_pins(repo, "eval")
    assert {"vllm", "lm-eval", "math-verify", "antlr4-python3-runtime", "langdetect", "immutabledict"} <= set(ev)
    assert {"vllm", "math", "ifeval"} <= ev["lm-eval"].extras
    # lm-eval's minerva_math asserts the ANTLR 4.11 runtime; math-verify must use the same one.
    assert str(ev["antlr4-python3-runtime"].specifier) == "==4.11.0" and "antlr4_11_0" in ev["math-verify"].extras
