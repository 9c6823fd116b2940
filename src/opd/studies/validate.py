"""Check study configs as the workflow does before any job: every check it runs at parse time.

    python -m opd.studies.validate config/config.yaml [overlay.yaml ...]

Several files are merged in order (later ones override, as `snakemake --configfile A B` does). A YAML
syntax error names the file and the line (Snakemake's own loader does not: run this first). `CHECKS` is
the one list the workflow runs too (workflow/rules/common.smk): the schema, the world's rules, the benchmark
names, the models already on disk (K within each vocabulary, one regular vocabulary per pair, weight files that load;
`opd.studies.checks`) and the memory planner (`opd.studies.plan`), so "valid" means the workflow will not
refuse the config. Each job checks its own inputs again when it starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd.infra.config import ConfigError
from opd.studies import checks, cost, plan
from opd.studies.checks import load, merge, model_problems, served_teacher_problems  # noqa: F401 - this module's API before opd.studies.checks

CHECKS = [*checks.CHECKS, plan.config_problems, cost.config_problems]


def validate(config: dict) -> dict:
    """`config` validated by every check the workflow runs (defaults filled in); ConfigError if it is not."""
    return checks.validate(config, CHECKS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate study config(s) as the workflow does before any job.")
    parser.add_argument("configfiles", nargs="+", type=Path, help="YAML config(s), merged in order")
    args = parser.parse_args(argv)
    names = " + ".join(map(str, args.configfiles))
    try:
        validate(load(args.configfiles))
    except ConfigError as err:
        sys.exit(f"{names}: {err}" if "\n" in str(err) else str(err))
    print(f"{names}: valid")


if __name__ == "__main__":
    main()
