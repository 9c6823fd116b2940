"""Documented check that a `snakemake --report` page renders its figures in headless Chromium.

    python tests/tools/render_report.py results/report.html /tmp/report_check   # needs /usr/bin/chromium

Screenshots the report's front page, then every embedded PNG figure (its data URI, as the page holds it)
laid out on one page, so a person (or an image diff) can see that each figure decodes and renders.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

FIGURE = re.compile(r'"name": "([^"]+\.png)".{0,2000}?"data_uri": "(data:image/png[^"]+)"', re.S)


def screenshot(url: str, out: Path, chromium: str, size: str = "1400,1100") -> None:
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
                    f"--window-size={size}", f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Render a Snakemake report and its figures in headless Chromium.")
    p.add_argument("report", type=Path, help="the self-contained report.html")
    p.add_argument("out_dir", type=Path, help="where the screenshots go")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary (Debian: apt install chromium)")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figures = FIGURE.findall(args.report.read_text())
    if not figures:
        raise SystemExit(f"{args.report}: no embedded PNG figure")
    page = args.out_dir / "figures.html"
    page.write_text("<html><body>" + "".join(f"<figure style='display:inline-block'><img width=420 src='{uri}'>"
                                             f"<figcaption>{name}</figcaption></figure>" for name, uri in figures)
                    + "</body></html>")
    screenshot(args.report.resolve().as_uri(), args.out_dir / "report.png", args.chromium)
    screenshot(page.resolve().as_uri(), args.out_dir / "figures.png", args.chromium)
    print(f"{len(figures)} figures ({', '.join(n for n, _ in figures)}): {args.out_dir}/report.png, figures.png")


if __name__ == "__main__":
    main()
