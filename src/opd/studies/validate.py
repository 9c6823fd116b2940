"""Check study configs as the Snakefile does before any job: the schema, then the world's own rules.

    python -m opd.studies.validate config/config.yaml [overlay.yaml ...]

Several files are merged in order (later ones override, as `snakemake --configfile A B` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from opd import worlds
from opd.infra.config import ConfigError, validate_config


def merge(base: dict, overlay: dict) -> dict:
    """Snakemake's --configfile merge: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(paths: list[Path]) -> dict:
    config: dict = {}
    for path in paths:
        with open(path) as fh:
            config = merge(config, yaml.safe_load(fh) or {})
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate study config(s) against the schema and the world.")
    parser.add_argument("configfiles", nargs="+", type=Path, help="YAML config(s), merged in order")
    args = parser.parse_args(argv)
    names = " + ".join(map(str, args.configfiles))
    try:
        validate_config(load(args.configfiles), checks=[worlds.config_problems])
    except ConfigError as err:
        sys.exit(f"{names}: {err}")
    print(f"{names}: valid")


if __name__ == "__main__":
    main()
