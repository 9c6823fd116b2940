"""Supervised fine-tuning of the miniature world's tiny Qwen3 models, from random weights.

The teacher and the three student scales are the same architecture (`Qwen3ForCausalLM`) at different
widths/depths and training lengths, sharing one tokenizer. The loss covers only the solution tokens
(and the closing EOS), never the prompt, as in instruction tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from opd.infra import cli, modeldirs
from opd.infra.io import read_jsonl, save_model_dir
from opd.worlds.miniature.generator import DEFAULT_MAX_VALUE, IN_DOMAIN, chain_length, iter_problems, sloppy, task_seed


def within_coverage(records: list[dict], max_chain: int | None) -> list[dict]:
    """The records a model's SFT sees: arithmetic chains of at most `max_chain` operations, and every
    out-of-domain record (None: all of them). A student whose SFT stops at short chains is weaker by what its
    data covers, not by stopping its training early, so distillation has something to teach it."""
    if max_chain is None:
        return records
    return [r for r in records if r["task"] not in IN_DOMAIN or chain_length(r["task"]) <= max_chain]


def sloppy_copy(records: list[dict], noise: float, seed: int, max_value: int) -> list[dict]:
    """The SFT set as a sloppy author wrote it (`generator.sloppy`: each arithmetic step off by one with
    probability `noise`); a pure function of the seed."""
    import random

    rng = random.Random(task_seed(seed, "sloppy", "sft"))
    return [sloppy(r, rng, noise, max_value) for r in records]


def build_model(vocab_size: int, hidden_size: int, layers: int, heads: int, kv_heads: int,
                intermediate_size: int, eos_id: int, seed: int, head_dim: int | None = None):
    """A randomly initialised Qwen3 causal LM (tied embeddings, as in the small Qwen3 models).

    Qwen3 sets head_dim apart from hidden_size / heads; vLLM's CPU attention needs head_dim >= 32.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden_size // heads, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def encode_examples(tokenizer, records: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example; the target ends with EOS so the model learns to stop."""
    out = []
    for prompt, target in iter_problems(records):
        p_ids = tokenizer(prompt)["input_ids"]
        t_ids = tokenizer(target)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p_ids + t_ids, len(p_ids)))
    return out


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids_BT, attention_mask_BT and labels_BT (-100 on prompt and padding)."""
    T = max(len(ids) for ids, _ in batch)
    input_ids_BT = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(batch), T), -100, dtype=torch.long)
    mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids_BT[i, : len(ids)] = torch.tensor(ids)
        labels_BT[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        mask_BT[i, : len(ids)] = 1
    return {"input_ids": input_ids_BT, "attention_mask": mask_BT, "labels": labels_BT}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, examples, steps: int, batch_size: int, lr: float, seed: int, pad_id: int,
          log_every: int, on_log=None) -> float:
    """The SFT loop; returns the mean loss of the last logging window."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    window, last = [], float("nan")
    for step in tqdm(range(steps), desc="sft", mininterval=5):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = collate([examples[i] for i in idx], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SFT loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            last = sum(window) / len(window)
            window = []
            if on_log:
                on_log(step + 1, {"loss": last, "lr": opt.param_groups[0]["lr"]})
    return last


# Flag -> the config key it stands for (opd.infra.cli; `*` = any model); one line per flag.
FLAGS = {
    "hidden_size": "models.*.hidden_size",
    "layers": "models.*.layers",
    "heads": "models.*.heads",
    "kv_heads": "models.*.kv_heads",
    "intermediate_size": "models.*.intermediate_size",
    "head_dim": "models.*.head_dim",
    "steps": "models.*.steps",
    "batch_size": "models.*.batch_size",
    "lr": "models.*.lr",
    "max_chain": "models.*.max_chain",
    "step_noise": "models.*.step_noise",
    "max_value": "world.max_value",
    "seed": "seed",
    "log_every": cli.POSITIVE,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description="Train a tiny Qwen3 model on the SFT set.")
    parser.add_argument("--data", type=Path, required=True, help="SFT JSONL (question/solution records)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory")
    parser.add_argument("--out-dir", type=Path, required=True, help="output Hugging Face model directory")
    parser.add_argument("--name", required=True, help="model name (teacher, student_s, ...) for tracking")
    parser.add_argument("--hidden-size", type=int, required=True, help="model width")
    parser.add_argument("--layers", type=int, required=True, help="number of transformer blocks")
    parser.add_argument("--heads", type=int, required=True, help="attention heads")
    parser.add_argument("--kv-heads", type=int, required=True, help="key/value heads (GQA)")
    parser.add_argument("--intermediate-size", type=int, required=True, help="MLP width")
    parser.add_argument("--head-dim", type=int, default=None, help="attention head width (default hidden/heads)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--max-chain", type=int, default=None,
                        help="train only on arithmetic chains of at most this many operations (default: all)")
    parser.add_argument("--step-noise", type=float, default=0.0,
                        help="probability that each arithmetic step of the SFT data is written off by one")
    parser.add_argument("--max-value", type=int, default=DEFAULT_MAX_VALUE, help="the world's largest number (world.max_value)")
    parser.add_argument("--seed", type=int, default=0, help="init and sampling seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=50, help="steps per logged loss")
    parser.add_argument("--study", default="miniature", help="MLflow experiment name")
    return cli.parse(parser, argv, FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from opd.infra import tracking

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(modeldirs.check_dir(args.tokenizer, "--tokenizer",
                                                                      modeldirs.TOKENIZER_FILES)))
    records = read_jsonl(args.data, required=("task", "question", "solution"))
    records = sloppy_copy(within_coverage(records, args.max_chain), args.step_noise, args.seed, args.max_value)
    examples = encode_examples(tokenizer, records)
    model = build_model(len(tokenizer), args.hidden_size, args.layers, args.heads, args.kv_heads,
                        args.intermediate_size, tokenizer.eos_token_id, args.seed, args.head_dim)
    n_params = sum(p.numel() for p in model.parameters())
    with tracking.run(args.study, f"sft[{args.name}]", params=vars(args), tags={"model": args.name}) as run:
        start = time.time()
        final = train(model, examples, args.steps, args.batch_size, args.lr, args.seed,
                      tokenizer.pad_token_id, args.log_every,
                      on_log=lambda step, m: run.log_metrics(m, step=step))
        save_model_dir(model, tokenizer, args.out_dir)
        summary = {"final_loss": final, "n_params": n_params, "train_seconds": time.time() - start}
        run.log_metrics(summary, step=args.steps)
        run.log_artifact(args.out_dir / "config.json")
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
