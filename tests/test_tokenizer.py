import random

from opd.worlds.miniature import generator as toy
from opd.worlds.miniature.tokenizer import EOS, train_tokenizer


def _corpus():
    recs = toy.generate("arith3", 200, seed=0, split="sft", distinct=False) + toy.generate(
        "reverse", 50, seed=0, split="sft", distinct=False)
    return [p + t for p, t in toy.iter_problems(recs)]


def test_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(_corpus(), vocab_size=400)
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = _corpus()[:20] + ["Unseen words too: état 3.5 ∑ 42!", "line one\nline two"]
    for text in texts:
        ids = again(text)["input_ids"]
        assert again.decode(ids) == text
        assert ids == tok(text)["input_ids"]
    assert again.eos_token == EOS and again.pad_token_id == again.eos_token_id


def test_digits_are_single_tokens():
    tok = train_tokenizer(_corpus(), vocab_size=400)
    pieces = [tok.decode([i]) for i in tok("12 plus 305 is 317.")["input_ids"]]
    digits = [p.strip() for p in pieces if p.strip().isdigit()]
    assert digits == list("12305317")


def test_training_is_deterministic():
    corpus = _corpus()
    random.Random(0).shuffle(corpus)
    a, b = train_tokenizer(corpus, 400), train_tokenizer(corpus, 400)
    assert a.get_vocab() == b.get_vocab()
