"""pass@1 of a HumanEval completion: the program (prompt + completion + the problem's tests) run in a fresh
Python process, passing when it exits cleanly within the time limit.

This runs model-written code. It refuses unless HF_ALLOW_CODE_EVAL=1, the switch of lm-eval's own code
metric (HF `evaluate`'s code_eval), which opd.studies.evaluate sets from config
evaluation.allow_code_execution and from nothing else. The limit is code_eval's default (3 s per program).
Unlike code_eval, no sandboxing beyond a separate process: `python -I` (no user site, no PYTHON* variables)
in an empty temporary directory with an environment holding only PATH. Run it where running untrusted code
is acceptable (docs/paper.md, "HumanEval").
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

TIMEOUT_S = 3.0  # HF evaluate code_eval's default timeout, which lm-eval's humaneval tasks use
SWITCH = "HF_ALLOW_CODE_EVAL"


class CodeExecutionRefused(RuntimeError):
    """Model-written code was about to run without the opt-in."""


def program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The file lm-eval's humaneval_instruct checks: the prompt, the completion up to its closing ``` fence,
    the problem's tests and the call of its check function."""
    body = completion if "```" not in completion else completion[: completion.find("```")]
    return f"{prompt}{body}\n{test}\ncheck({entry_point})\n"


def passes(source: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether `source` runs to a clean exit within `timeout` seconds (an error, assert or timeout fails)."""
    if os.environ.get(SWITCH) != "1":
        raise CodeExecutionRefused(f"running model-written code needs {SWITCH}=1 (set by opd.studies.evaluate "
                                   f"from config evaluation.allow_code_execution: true)")
    with tempfile.TemporaryDirectory(prefix="opd_code_eval_") as cwd:
        try:
            done = subprocess.run([sys.executable, "-I", "-"], input=source, text=True, capture_output=True,
                                  timeout=timeout, cwd=cwd, env={"PATH": os.environ.get("PATH", "")})
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0
