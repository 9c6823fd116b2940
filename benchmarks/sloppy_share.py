"""How much of its probability a miniature student puts on the right value where its sloppy data wrote one off.

Teacher-forced on the clean benchmark solutions' first step ("16 minus 4 is 12"), it compares the student's
log-probability of the right result with that of the off-by-one its SFT data wrote (`generator.sloppy`: one more,
one less at `max_value`), from the first token where the two differ. A student converged on data with
`step_noise` 0.8 puts about 0.2 on the right value. docs/miniature-world.md quotes it:

    PYTHONPATH=src .venv/bin/python benchmarks/sloppy_share.py results/models/student_m results/check/avx2/models/student_m
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from opd import worlds
from opd.worlds.miniature.generator import IN_DOMAIN, sloppy

WORLD = worlds.get("miniature")


def first_step_share(model_dir: Path, data_dir: Path, max_value: int) -> tuple[float, float]:
    """(mean P(right | right or off-by-one), share of problems where the right value is the likelier)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    shares = []
    for task in IN_DOMAIN:
        for line in (data_dir / f"{task}.jsonl").open():
            rec = json.loads(line)
            # The first step as written clean and as the sloppy author writes it when he slips (noise 1).
            steps = (r["solution"].split(".")[0] for r in (rec, sloppy(rec, random.Random(0), 1.0, max_value)))
            prompt = WORLD.encode_prompt(tok, rec["question"], "plain", True)
            # The solution follows "Answer:" after a space, as in the SFT data.
            ids_r, ids_w = (tok(f" {step}.", add_special_tokens=False)["input_ids"] for step in steps)
            first = next(i for i, (a, b) in enumerate(zip(ids_r, ids_w)) if a != b)
            logps = []
            for ids in (ids_r, ids_w):
                with torch.no_grad():
                    logp_T = model(torch.tensor([prompt + ids])).logits.log_softmax(-1)[0]
                logps.append(sum(logp_T[len(prompt) + i - 1, ids[i]].item() for i in range(first, len(ids))))
            shares.append(torch.sigmoid(torch.tensor(logps[0] - logps[1])).item())
    return sum(shares) / len(shares), sum(s > 0.5 for s in shares) / len(shares)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", type=Path, nargs="+", help="student model directories")
    p.add_argument("--data", type=Path, default=Path("results/data"), help="directory of the world's JSONL files")
    p.add_argument("--max-value", type=int, default=20, help="the world's largest number (world.max_value; 20 in config/config.yaml)")
    args = p.parse_args()
    for model_dir in args.models:
        share, preferred = first_step_share(model_dir, args.data, args.max_value)
        print(f"{model_dir}: mean P(right | right or off-by-one) {share:.3f}; right the likelier on "
              f"{100 * preferred:.1f}% of first steps")


if __name__ == "__main__":
    main()
