"""Prompt text: the miniature world's plain template, unchanged, and a Qwen3-style chat template."""

import shutil

import pytest

from opd import worlds
from opd.engines import train

WORLD = worlds.get("miniature")
PROMPT_TEMPLATE = WORLD.plain_template

# Qwen3's template, cut down to what one user turn and the generation prompt use.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                 "{% endif %}")
QUESTION = "Start with 3. Add 4. What is the result?"


@pytest.fixture
def chat_tokenizer(tiny_world):
    tok = tiny_world["tokenizer"].__class__.from_pretrained(str(tiny_world["student"]))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_plain_is_the_miniature_template_byte_for_byte(tiny_world):
    tok = tiny_world["tokenizer"]
    for thinking in (True, False):
        assert WORLD.render_prompt(tok, QUESTION, "plain", thinking) == f"Question: {QUESTION}\nAnswer:"
        assert WORLD.encode_prompt(tok, QUESTION, "plain", thinking) == tok(
            PROMPT_TEMPLATE.format(question=QUESTION))["input_ids"]


def test_chat_renders_one_user_turn_and_opens_the_assistant_turn(chat_tokenizer):
    assert WORLD.render_prompt(chat_tokenizer, QUESTION, "chat", True) == (
        "<|im_start|>user\nStart with 3. Add 4. What is the result?<|im_end|>\n<|im_start|>assistant\n")
    assert WORLD.render_prompt(chat_tokenizer, QUESTION, "chat", False) == (
        "<|im_start|>user\nStart with 3. Add 4. What is the result?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n")
    text = WORLD.render_prompt(chat_tokenizer, QUESTION, "chat", False)
    assert WORLD.encode_prompt(chat_tokenizer, QUESTION, "chat", False) == chat_tokenizer(
        text, add_special_tokens=False)["input_ids"]


def test_chat_without_a_template_and_unknown_formats_are_refused(tiny_world):
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        WORLD.render_prompt(tiny_world["tokenizer"], QUESTION, "chat", True)
    with pytest.raises(ValueError, match="unknown prompt format 'xml'"):
        WORLD.render_prompt(tiny_world["tokenizer"], QUESTION, "xml", True)


def test_train_and_rollout_take_the_same_flags_and_train_encodes_chat_prompts(tiny_world, chat_tokenizer, tmp_path):
    from opd.engines import rollout

    r = rollout.parse_args(["--model-dir", "m", "--world", "miniature", "--prompts", "p", "--out", "o"])
    assert (r.prompt_format, r.enable_thinking) == ("plain", True)
    r = rollout.parse_args(["--model-dir", "m", "--world", "miniature", "--prompts", "p", "--out", "o", "--prompt-format", "chat",
                            "--no-enable-thinking"])
    assert (r.prompt_format, r.enable_thinking) == ("chat", False)
    dirs = {}
    for name in ("student", "teacher"):
        dirs[name] = tmp_path / name
        shutil.copytree(tiny_world[name], dirs[name])
        chat_tokenizer.save_pretrained(str(dirs[name]))
    args = train.parse_args(["--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]),
                             "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(tmp_path / "out"),
                             "--method", "full", "--prompts-per-step", "2", "--prompt-format", "chat",
                             "--no-enable-thinking"])
    tr = train.setup(args)
    assert tr.prompt_ids[0] == WORLD.encode_prompt(chat_tokenizer, tr.records[0]["question"], "chat", False)
    assert tr.tokenizer.decode(tr.prompt_ids[0]).endswith("</think>\n\n")
