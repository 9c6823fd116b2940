"""How a question becomes the prompt a model sees: one function for training and the diagnostic rollouts.

`plain` is the world's own template (the miniature world's "Question: ...\\nAnswer:"): its toy models were
trained on exactly that text, so it stays byte-identical. `chat` is the tokenizer's own chat template with
one user turn and the assistant header opened (Qwen3 style), with `enable_thinking` passed to the template:
Qwen3's switch between a <think> trace and a direct answer. Real chat models see their instruction format;
a plain "Question:" prompt would put their rollouts off-distribution.
"""

from __future__ import annotations

PROMPT_FORMATS = ("plain", "chat")


def render_prompt(tokenizer, question: str, prompt_format: str, enable_thinking: bool, plain_template: str) -> str:
    """The prompt text for one question (`enable_thinking` only matters for `chat`)."""
    if prompt_format == "plain":
        return plain_template.format(question=question)
    if prompt_format != "chat":
        raise ValueError(f"unknown prompt format {prompt_format!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template; this one has none "
                         "(use the plain format, or a chat model's tokenizer)")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=enable_thinking)


def encode_prompt(tokenizer, question: str, prompt_format: str, enable_thinking: bool, plain_template: str) -> list[int]:
    """Token ids of the rendered prompt.

    A chat template already writes its special tokens (e.g. a BOS), so the tokenizer must not add them
    a second time; the plain prompt is encoded exactly as the toy models' training data was.
    """
    text = render_prompt(tokenizer, question, prompt_format, enable_thinking, plain_template)
    return tokenizer(text, add_special_tokens=prompt_format == "plain")["input_ids"]
