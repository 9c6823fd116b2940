"""Teacher/student pairs across chat templates (opd.engines.pairing, issue 20): tiny tokenizers and models
built here (no hub). The student and teacher share the miniature BPE vocabulary and differ in their added
special tokens, EOS and chat template, as Qwen2.5-3B and DeepSeek-R1-Distill-Qwen-14B do."""

import math

import pytest
import torch

from opd import worlds
from opd.engines import pairing, train
from opd.engines.rollout import Rollouts
from opd.engines.score import TokenizerMismatch, load_scores, score_rollouts, score_through
from opd.infra.io import read_jsonl
from opd.studies import fixed_context

S_TEMPLATE = ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
              "{% if add_generation_prompt %} Answer:{% endif %}")
T_TEMPLATE = ("{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
T_PADDING = 3  # the teacher's LM head has rows beyond its tokenizer (as the distill's 152,064 > 151,665)


def tokenizer(base_dir, specials: list[str], eos: str, template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def cross(tiny_world, tmp_path_factory):
    """Student: the miniature vocabulary (its added tokens 0-2 kept by both) + <|eot|> (its EOS), an [INST]
    template. Teacher: the same + <｜User｜>, <｜Assistant｜>, <｜end｜> (its EOS), the distill's template and
    padding rows in its head."""
    from opd.worlds.miniature.sft import build_model

    root = tmp_path_factory.mktemp("cross")
    base = tiny_world["student"]
    s_tok = tokenizer(base, ["<|eot|>"], "<|eot|>", S_TEMPLATE)
    t_tok = tokenizer(base, ["<｜User｜>", "<｜Assistant｜>", "<｜end｜>"], "<｜end｜>", T_TEMPLATE)
    dirs = {}
    for name, tok, rows, (hidden, layers, seed) in (("student", s_tok, len(s_tok), (16, 1, 2)),
                                                    ("teacher", t_tok, len(t_tok) + T_PADDING, (32, 2, 1))):
        model = build_model(rows, hidden, layers, 2, 1, 2 * hidden, tok.eos_token_id, seed, head_dim=32)
        dirs[name] = root / name
        model.save_pretrained(str(dirs[name]))
        tok.save_pretrained(str(dirs[name]))
    return {"s_tok": s_tok, "t_tok": t_tok, "n": len(tiny_world["tokenizer"]), "prompts": tiny_world["prompts"], **dirs}


def test_the_pair_maps_regular_ids_and_the_eos_and_nothing_else(cross):
    n = cross["n"]  # base vocabulary; student <|eot|> = n; teacher <｜User｜> n, <｜Assistant｜> n+1, <｜end｜> n+2
    pair = pairing.pair_tokenizers(cross["s_tok"], cross["t_tok"])
    assert not pair.same
    assert pair.s2t[:n].tolist() == list(range(n)) and pair.t2s[:n].tolist() == list(range(n))
    assert int(pair.s2t[n]) == n + 2 and int(pair.t2s[n + 2]) == n  # the student's EOS is the teacher's EOS
    assert pair.t2s[n:n + 2].tolist() == [-1, -1]  # the teacher's turn markers: no student reading
    assert pairing.pair_tokenizers(cross["s_tok"], cross["s_tok"]).same  # one tokenizer: nothing mapped
    # Another end-of-turn id of the student (its generation_config's EOS list) reads as the teacher's EOS too,
    # and the teacher's EOS still reads back as the student's own EOS.
    ends = pairing.pair_tokenizers(cross["s_tok"], cross["t_tok"], end_ids=pairing.generation_end_ids(cross["student"]))
    assert pairing.generation_end_ids(cross["student"]) == (n,)  # build_model's generation config: <|eot|>
    more = pairing.pair_tokenizers(cross["s_tok"], cross["t_tok"], end_ids=(2,))  # the base's <|im_end|>
    assert int(more.s2t[2]) == n + 2 and int(more.t2s[n + 2]) == n and torch.equal(ends.s2t, pair.s2t)


def test_pairs_whose_regular_vocabularies_differ_are_refused_naming_the_first_differing_id(tiny_world):
    from opd.worlds.miniature import generator as toy
    from opd.worlds.miniature.tokenizer import train_tokenizer

    other = train_tokenizer([p + t for p, t in toy.iter_problems(toy.generate("reverse", 40, 1, "x"))], 300)
    tok = tiny_world["tokenizer"]
    mine, theirs = pairing.regular_vocab(tok), pairing.regular_vocab(other)
    first = min(i for i in set(mine) | set(theirs) if mine.get(i) != theirs.get(i))
    with pytest.raises(TokenizerMismatch, match=f"differ on regular \\(non-added\\) token id {first}: "
                                                f"student reads {mine.get(first)!r}, teacher reads"):
        pairing.pair_tokenizers(tok, other)


def hand_rollouts(cross, question: str, response: list[int], s_topk: list[list[int]]) -> Rollouts:
    world = worlds.get("miniature")
    prompt = world.encode_prompt(cross["s_tok"], question, "chat", True)
    K = len(s_topk[0])
    return Rollouts(["q1#0"], {
        "offsets_B1": torch.tensor([0, len(response)]), "tokens_N": torch.tensor(response, dtype=torch.int32),
        "s_logprob_N": torch.zeros(len(response)), "s_topk_ids_NK": torch.tensor(s_topk, dtype=torch.int32),
        "s_topk_logprobs_NK": torch.zeros(len(response), K), "prompt_offsets_B1": torch.tensor([0, len(prompt)]),
        "prompt_tokens_P": torch.tensor(prompt, dtype=torch.int32)},
        {"questions": [question], "world": "miniature", "prompt_format": "chat", "enable_thinking": True})


def test_cross_template_scores_equal_those_of_the_teacher_prompt_rendered_by_hand(cross):
    from transformers import AutoModelForCausalLM

    s_tok, t_tok, n = cross["s_tok"], cross["t_tok"], cross["n"]
    question = "12+7="
    body = s_tok("19", add_special_tokens=False)["input_ids"]
    response = body + [n]  # ... then the student's EOS <|eot|>
    beyond = len(s_tok) + 1  # a student top-K id with no teacher reading: scored at the teacher's floor
    s_topk = [[body[0], n, beyond, 5]] + [[r, 3, 4, 5] for r in response[1:]]
    rollouts = hand_rollouts(cross, question, response, s_topk)
    view = pairing.view_from_meta(pairing.pair_tokenizers(s_tok, t_tok), t_tok, rollouts, "rollouts")
    by_hand = t_tok("<｜User｜>" + question + "<｜Assistant｜>", add_special_tokens=False)["input_ids"]
    assert view.prompts == [by_hand]
    teacher = AutoModelForCausalLM.from_pretrained(str(cross["teacher"])).eval()
    student = AutoModelForCausalLM.from_pretrained(str(cross["student"])).eval()
    K = 4
    got = score_through(view, rollouts, lambda r, t2s: score_rollouts(teacher, r, K, 8, t2s=t2s), K, 8, student)

    # By hand: the teacher on its own prompt + the response with <|eot|> read as <｜end｜> (n + 2).
    t_resp = body + [n + 2]
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.tensor([by_hand + t_resp])).logits[0].float(), -1)
        s_logp = torch.log_softmax(student(torch.tensor([rollouts.sequences()[0][0] + response])).logits[0].float(), -1)
    rows = logp[len(by_hand) - 1: len(by_hand) - 1 + len(t_resp)]
    assert torch.allclose(got["t_logprob_N"], rows[torch.arange(len(t_resp)), torch.tensor(t_resp)], atol=1e-5)
    on_s = torch.stack([rows[0, body[0]], rows[0, n + 2], rows[0].min(), rows[0, 5]])  # n -> n+2; beyond -> floor
    assert torch.allclose(got["t_on_s_logprobs_NK"][0], on_s, atol=1e-5)
    readable = torch.ones(rows.shape[1], dtype=torch.bool)
    readable[[n, n + 1]] = False  # <｜User｜>, <｜Assistant｜>
    readable[len(t_tok):] = False  # the padding rows
    top = rows.masked_fill(~readable, float("-inf")).topk(K, dim=-1)
    assert torch.allclose(got["t_topk_logprobs_NK"], top.values, atol=1e-5)
    expected_ids = torch.where(top.indices == n + 2, n, top.indices)  # back in student ids
    assert torch.equal(got["t_topk_ids_NK"].long(), expected_ids)
    s_rows = s_logp[len(rollouts.sequences()[0][0]) - 1:][: len(response)]
    assert torch.allclose(got["s_on_t_logprobs_NK"], s_rows.gather(-1, expected_ids), atol=1e-5)


def test_a_response_token_the_teacher_cannot_read_is_refused_naming_it(cross):
    s_tok = tokenizer(cross["student"], ["<|tool|>"], "<|eot|>", S_TEMPLATE)  # <|tool|>: n + 1
    n = cross["n"]
    pair = pairing.pair_tokenizers(s_tok, cross["t_tok"])
    assert int(pair.s2t[n + 1]) == -1
    r = hand_rollouts(cross, "1+1=", [5, n + 1, n], [[5, 6]] * 3)
    with pytest.raises(TokenizerMismatch, match=r"rollout 'q1#0', response position 1: token \d+ \('<\|tool\|>'\) "
                                                 r"of student has no reading in teacher's tokenizer"):
        pairing.TeacherView(pair, [[1, 2]]).rollouts(r)


def test_training_and_the_score_job_run_a_cross_template_pair(cross, tmp_path):
    """Training (teacher in process and in a worker: the same loss) and the diagnostic score and fixed-context
    jobs on it."""
    from opd.engines import rollout, score

    common = ["--student", str(cross["student"]), "--teacher", str(cross["teacher"]), "--world", "miniature",
              "--prompts", str(cross["prompts"]), "--method", "full", "--steps", "1", "--prompts-per-step", "2",
              "--samples", "1", "--max-new-tokens", "6", "--top-k", "4", "--prompt-format", "chat",
              "--study", "test_pairing"]
    final = train.main(common + ["--out-dir", str(tmp_path / "in_process")])
    worker = train.main(common + ["--out-dir", str(tmp_path / "worker"), "--teacher-placement", "worker"])
    assert final["loss"] == pytest.approx(worker["loss"], abs=1e-6) and final["reverse_kl_all"] == pytest.approx(
        worker["reverse_kl_all"], abs=1e-6)
    rollout.main(["--model-dir", str(cross["student"]), "--prompts", str(cross["prompts"]), "--out",
                  str(tmp_path / "r.safetensors"), "--n-prompts", "2", "--samples", "1", "--max-new-tokens", "6",
                  "--top-k", "4", "--world", "miniature", "--prompt-format", "chat", "--study", "test_pairing"])
    score.main(["--rollouts", str(tmp_path / "r.safetensors"), "--teacher", str(cross["teacher"]), "--student",
                str(cross["student"]), "--out", str(tmp_path / "s.safetensors"), "--top-k", "4",
                "--study", "test_pairing"])
    r = Rollouts.load(tmp_path / "r.safetensors")
    s = load_scores(tmp_path / "s.safetensors", r)
    questions = [rec["question"] for rec in read_jsonl(cross["prompts"])[:2]]
    assert r.meta["questions"] == questions
    assert int(s["t_topk_ids_NK"].max()) < len(cross["s_tok"])  # every teacher top-K id is a student id
    fixed_context.main(["--rollouts", str(tmp_path / "r.safetensors"), "--scores", str(tmp_path / "s.safetensors"),
                        "--student", str(cross["student"]), "--teacher", str(cross["teacher"]),
                        "--out", str(tmp_path / "fc.csv"), "--selectors", "full", "--steps", "1",
                        "--study", "test_pairing"])
    assert (tmp_path / "fc.csv").is_file()


def test_the_fixed_context_kl_of_a_cross_template_teacher_by_hand():
    # Teacher vocabulary 5, p_T = (0.1, 0.2, 0.3, 0.3, 0.1); student ids 0, 1, 2 read as teacher 0, 1, 4, student
    # id 3 has no reading. On the student's ids p̄_T = (0.1, 0.2, 0.1, 0) / 0.4 = (0.25, 0.5, 0.25, 0); against a
    # uniform p_S = 1/4: KL(p̄_T ‖ p_S) = 0.25·log 1 + 0.5·log 2 + 0.25·log 1 + 0 = 0.5·log 2.
    t_logp = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1]]).log()
    on_s = fixed_context.teacher_on_student_ids(t_logp, torch.tensor([0, 1, 4, -1]), 4)
    assert on_s.exp()[0].tolist() == pytest.approx([0.25, 0.5, 0.25, 0.0])
    (kl,) = fixed_context._forward_kl_on_shared(torch.full((1, 4), 0.25).log(), on_s)
    assert kl.item() == pytest.approx(0.5 * math.log(2))
