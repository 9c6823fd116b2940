"""benchmarks/gpu_smoke.py's CPU-runnable part (--tiny), with the packages a bare GPU machine lacks blocked."""

import ast
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
ABSENT = ("vllm", "lm_eval", "snakemake", "mlflow", "ruptures", "nltk", "math_verify", "jsonschema")
STDLIB = {"__future__", "argparse", "json", "sys", "tempfile", "time", "pathlib"}


def test_top_level_imports_are_only_torch_transformers_safetensors():
    tree = ast.parse(SCRIPT.read_text())
    names = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert names - STDLIB <= {"torch", "transformers", "safetensors"}


def test_tiny_run_prints_every_phase_without_the_cluster_packages(tmp_path):
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in ABSENT)  # `import m` then raises ImportError
    code = (f"import sys, runpy; {block}; sys.argv = ['gpu_smoke.py', '--tiny']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tiny"] is True and out["device"] == "cpu"
    for phase in ("scoring", "update", "train"):
        assert "error" not in out[phase] and out[phase]["seconds"] > 0 and out[phase]["peak_gib"] is None
    assert out["update"]["tokens_per_second"] > 0 and out["update"]["mfu"] is None
    assert set(out["planned_peak_gib"]) == {"update", "scoring", "train"}
    assert all(v > 0 for v in out["planned_peak_gib"].values())
    # the cost planner's estimate beside each measured time; no efficiency is implied from a CPU run
    assert out["reference_gpu"] == "h100_sxm"
    for phase in ("scoring", "update", "train"):
        assert out[phase]["planned_seconds"] > 0 and out[phase]["implied_efficiency"] is None
