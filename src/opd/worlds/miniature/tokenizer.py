"""Train the miniature world's tokenizer locally (no hub) and save it with `save_pretrained`.

Byte-level BPE, like Qwen3's, with digits split one per token: arithmetic on single-digit tokens is
systematic (carry rules), whereas whole-number tokens would turn it into a lookup table a tiny model
cannot memorise. Teacher and students share this one tokenizer, which on-policy distillation needs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opd.infra import cli
from opd.infra.io import read_jsonl

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A `PreTrainedTokenizerFast` trained on `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None, unk_token=None,
        model_max_length=512,
    )


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Train the shared BPE tokenizer on the SFT corpus.")
    parser.add_argument("--corpus", type=Path, nargs="+", required=True, help="JSONL files to train on")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (incl. 256 bytes)")
    parser.add_argument("--out-dir", type=Path, required=True, help="where `save_pretrained` writes")
    parser.add_argument("--study", default="miniature", help="MLflow experiment name")
    args = cli.parse(parser, argv, {"vocab_size": "world.vocab_size"})

    from opd.infra import tracking
    from opd.worlds.miniature.generator import iter_problems

    texts = [p + t for path in args.corpus for p, t in iter_problems(read_jsonl(path))]
    with tracking.run(args.study, "tokenizer", params=vars(args)) as run:
        tok = train_tokenizer(texts, args.vocab_size)
        tok.save_pretrained(str(args.out_dir))
        n_tokens = sum(len(tok(t)["input_ids"]) for t in texts[:1000])
        run.log_metrics({"vocab_size": len(tok), "tokens_per_example": n_tokens / max(1, min(1000, len(texts)))})
    print(json.dumps({"vocab_size": len(tok)}))


if __name__ == "__main__":
    cli.run(main)
