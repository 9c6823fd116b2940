"""Teacher/student pairs across chat templates: the teacher reads the prompt in its own template.

Two tokenizers may agree on every REGULAR token (the byte-level BPE vocabulary: every id that is not an
added token) and differ in their added special tokens and chat template, as DeepSeek-R1-Distill-Qwen-14B
and Qwen2.5-3B do (Qwen2.5's vocabulary; the distill's <｜User｜>, <｜Assistant｜>, <think> ... sit on ids
where Qwen2.5 has <|im_start|>, <|im_end|>, <|box_start|> ...). Such a pair is distilled as follows:
- the teacher scores the student's response after the prompt rendered with the TEACHER's template (the
  question rendered by `World.encode_prompt` with the teacher's tokenizer: its chat template, its BOS);
- response ids: a regular id means the same to both. An added token maps to the teacher's token of the same
  text, and the student's EOS (and its generation_config's other EOS ids) to the teacher's EOS (the stated
  rule: the end of a response is the end for both); a response token with no teacher reading (e.g. the
  student's <|im_start|> for the distill) is refused, naming the rollout, the position and the token;
- the teacher's own top-K is taken over the ids the student can read (the teacher's other ids, its own
  special tokens and its padding rows, are left out before the top-K) and mapped back to student ids;
- the teacher's log-prob at a student top-K id with no teacher reading is the teacher's smallest
  log-prob at that position (the token is, for the teacher, as unlikely as any);
- pairs whose regular vocabularies differ are refused, naming the first id they read differently.
A pair with the same vocabulary, EOS and chat template is the same-tokenizer case: nothing is mapped or
re-rendered, and every number is what it was before this module.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from opd.infra.io import InputError


class TokenizerMismatch(InputError):
    """Teacher and student tokenizers read regular ids differently: OPD would compare unrelated tokens."""


def regular_vocab(tokenizer) -> dict[int, str]:
    """id -> token of every id that is not an added (special or control) token."""
    added = set(tokenizer.added_tokens_decoder)
    return {i: t for t, i in tokenizer.get_vocab().items() if i not in added}


def first_difference(student: dict[int, str], teacher: dict[int, str]) -> int | None:
    return next((i for i in sorted(set(student) | set(teacher)) if student.get(i) != teacher.get(i)), None)


def map_ids(ids: Tensor, table: Tensor) -> Tensor:
    """table[ids], with -1 for ids beyond the table (e.g. a model's padding rows)."""
    inside = ids < len(table)
    return torch.where(inside, table[ids.long().clamp(max=len(table) - 1)], torch.full_like(ids.long(), -1))


@dataclasses.dataclass
class TokenPair:
    """How the teacher reads the student's ids; `same` = one tokenizer, one template (nothing to do)."""
    same: bool
    s2t: Tensor  # student id -> teacher id, -1 where the teacher has no reading
    t2s: Tensor  # teacher id -> student id, -1 where the student has none
    names: tuple[str, str]
    s_tokens: list[str]  # student id -> its token text, for messages

    def response_ids(self, ids_N: Tensor, rollout_ids: list[str], offsets_B1: Tensor) -> Tensor:
        """The student's sampled ids as teacher ids; a TokenizerMismatch for one the teacher cannot read."""
        out = map_ids(ids_N, self.s2t)
        bad = (out < 0).nonzero()
        if len(bad):
            n = int(bad[0, 0])
            b = int(torch.searchsorted(offsets_B1, torch.tensor(n), right=True)) - 1
            tok = int(ids_N[n])
            text = self.s_tokens[tok] if tok < len(self.s_tokens) else "<a padding row>"
            raise TokenizerMismatch(
                f"rollout {rollout_ids[b]!r}, response position {n - int(offsets_B1[b])}: token {tok} ({text!r}) of "
                f"{self.names[0]} has no reading in {self.names[1]}'s tokenizer (only regular tokens, the EOS and "
                f"added tokens of the same text are mapped; opd.engines.pairing)")
        return out.to(ids_N.dtype)

    def topk_ids(self, ids_NK: Tensor) -> Tensor:
        """Student top-K ids as teacher ids; -1 where the teacher has no reading (scored at its floor)."""
        return map_ids(ids_NK, self.s2t).to(torch.int32)

    def to_student(self, t_ids_NK: Tensor) -> Tensor:
        return map_ids(t_ids_NK, self.t2s).to(t_ids_NK.dtype)


def pair_tokenizers(student, teacher, student_name: str = "student", teacher_name: str = "teacher",
                    end_ids: tuple[int, ...] = ()) -> TokenPair:
    """The pair's TokenPair, or a TokenizerMismatch naming the first regular id the two read differently.

    `end_ids`: the student's other end-of-turn ids (its generation_config's EOS list, `generation_end_ids`),
    read as the teacher's EOS like the student's own EOS (Qwen2.5's <|im_end|> and <|endoftext|>)."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    s_tokens = [""] * (max(sv.values(), default=-1) + 1)
    for t, i in sv.items():
        s_tokens[i] = t
    same = (sv == tv and student.eos_token_id == teacher.eos_token_id
            and getattr(student, "chat_template", None) == getattr(teacher, "chat_template", None))
    if same:
        ident = torch.arange(len(s_tokens))
        return TokenPair(True, ident, ident, (student_name, teacher_name), s_tokens)
    sr, tr = regular_vocab(student), regular_vocab(teacher)
    diff = first_difference(sr, tr)
    if diff is not None:
        raise TokenizerMismatch(
            f"tokenizers of {student_name} and {teacher_name} differ on regular (non-added) token id {diff}: "
            f"{student_name} reads {sr.get(diff, '<no regular token>')!r}, {teacher_name} reads "
            f"{tr.get(diff, '<no regular token>')!r} ({len(sr)} vs {len(tr)} regular tokens); OPD needs one "
            f"regular vocabulary")
    s2t = torch.full((len(s_tokens),), -1, dtype=torch.long)
    t2s = torch.full((max(tv.values(), default=-1) + 1,), -1, dtype=torch.long)
    for i in sr:
        s2t[i] = t2s[i] = i
    ends = [i for i in (student.eos_token_id, *end_ids) if i is not None and i < len(s_tokens)]
    pairs = [(i, teacher.eos_token_id) for i in ends]  # the ends first: every one is the teacher's EOS
    pairs += [(i, tv[text]) for i, text in ((i, s_tokens[i]) for i in student.added_tokens_decoder) if text in tv]
    for s_id, t_id in pairs:
        if t_id is None or s2t[s_id] >= 0 or (t2s[t_id] >= 0 and s_id not in ends):
            continue  # one to one, except the ends (the teacher's EOS reads back as the student's own EOS)
        s2t[s_id] = t_id
        if t2s[t_id] < 0:
            t2s[t_id] = s_id
    return TokenPair(False, s2t, t2s, (student_name, teacher_name), s_tokens)


def generation_end_ids(model_dir) -> tuple[int, ...]:
    """The EOS id(s) of a model directory's generation_config.json (none without one)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


@dataclasses.dataclass
class TeacherView:
    """One batch of rollouts as the teacher reads them: its own prompt per rollout, the pair's id maps."""
    pair: TokenPair
    prompts: list[list[int]]  # per rollout: the teacher's rendering of the rollout's question

    def rollouts(self, rollouts):
        """A copy of `rollouts` in teacher ids: the teacher's prompts, mapped response and student top-K ids."""
        t = rollouts.tensors
        lengths = torch.tensor([0] + [len(p) for p in self.prompts])
        tensors = {**t, "tokens_N": self.pair.response_ids(t["tokens_N"], rollouts.ids, t["offsets_B1"]),
                   "s_topk_ids_NK": self.pair.topk_ids(t["s_topk_ids_NK"]), "prompt_offsets_B1": lengths.cumsum(0),
                   "prompt_tokens_P": torch.tensor([i for p in self.prompts for i in p], dtype=torch.int32)}
        return dataclasses.replace(rollouts, tensors=tensors)


def question_key(rollout_id: str) -> str:
    """The prompt record of a rollout id (`<record id>#<sample>`, as opd.engines.rollout and train write them)."""
    return rollout_id.rsplit("#", 1)[0]


def teacher_prompts(world, teacher_tokenizer, questions: list[str], prompt_format: str,
                    enable_thinking: bool) -> list[list[int]]:
    """Each question rendered and encoded as the teacher reads it (its template; one encoding per question)."""
    cache: dict[str, list[int]] = {}
    for q in questions:
        if q not in cache:
            cache[q] = world.encode_prompt(teacher_tokenizer, q, prompt_format, enable_thinking)
    return [cache[q] for q in questions]


def view_from_meta(pair: TokenPair, teacher_tokenizer, rollouts, path) -> TeacherView | None:
    """The teacher's view of a rollouts file (its questions and prompt settings, written by opd.engines.rollout);
    None for a same-tokenizer pair."""
    from opd import worlds

    if pair.same:
        return None
    meta = rollouts.meta
    if "questions" not in meta:
        raise InputError(f"{path}: no questions in its metadata (written before cross-template pairs); the teacher "
                         f"{pair.names[1]} needs them to render its own prompts: re-run the rollout job")
    prompts = teacher_prompts(worlds.get(meta["world"]), teacher_tokenizer, meta["questions"], meta["prompt_format"],
                              meta["enable_thinking"])
    return TeacherView(pair, prompts)


@dataclasses.dataclass
class PromptBook:
    """The teacher's prompt of every training record (by record id): the view of any batch of rollouts."""
    pair: TokenPair
    prompts: dict[str, list[int]]

    @classmethod
    def build(cls, pair: TokenPair, world, teacher_tokenizer, records: list[dict], prompt_format: str,
              enable_thinking: bool) -> "PromptBook | None":
        """None for a same-tokenizer pair (nothing to map or re-render)."""
        if pair.same:
            return None
        prompts = teacher_prompts(world, teacher_tokenizer, [r["question"] for r in records], prompt_format,
                                  enable_thinking)
        return cls(pair, {str(r["id"]): p for r, p in zip(records, prompts)})

    def view(self, rollout_ids: list[str]) -> TeacherView:
        return TeacherView(self.pair, [self.prompts[question_key(i)] for i in rollout_ids])
