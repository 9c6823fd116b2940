import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.infra import store
from opd.engines.rollout import Rollouts, generate_hf, main as rollout_main, token_char_offsets
from opd.engines.score import TokenizerMismatch, load_scores, main as score_main, pair_tokenizers, score_rollouts
from opd.engines.forward import sampled_logprob, supervised_map
from opd.engines.signals import batch_signals

K = 4


def _prompts(tok, n=3):
    return [tok(f"Question: Start with {i}. Add 2. What is the result?\nAnswer:")["input_ids"] for i in range(n)]


@pytest.fixture(scope="module")
def student(tiny_world):
    return AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()


def test_greedy_is_deterministic_and_top1(tiny_world, student):
    tok = tiny_world["tokenizer"]
    a = generate_hf(student, tok, _prompts(tok), K, 0.0, 1.0, 12, seed=0, batch_size=2)
    b = generate_hf(student, tok, _prompts(tok), K, 0.0, 1.0, 12, seed=5, batch_size=3)
    assert torch.equal(a["tokens_N"], b["tokens_N"])
    # greedy: the sampled token is the student's top-1 and carries its logprob
    assert torch.equal(a["tokens_N"], a["s_topk_ids_NK"][:, 0])
    assert torch.allclose(a["s_logprob_N"], a["s_topk_logprobs_NK"][:, 0])
    assert bool((a["s_topk_logprobs_NK"][:, :-1] >= a["s_topk_logprobs_NK"][:, 1:]).all())


def test_sampled_logprobs_match_a_teacher_forced_pass(tiny_world, student):
    """KV-cached generation and one full forward pass must agree on log p_S(y_t)."""
    tok = tiny_world["tokenizer"]
    t = generate_hf(student, tok, _prompts(tok, 4), K, 1.0, 1.0, 16, seed=3, batch_size=4)
    r = Rollouts([f"r{i}" for i in range(4)], t)
    seqs = r.sequences()
    with torch.no_grad():
        (again,), _ = supervised_map(student, [p for p, _ in seqs], [x for _, x in seqs], None, sampled_logprob,
                                     (t["tokens_N"],), chunk=5)
    assert torch.allclose(again, t["s_logprob_N"], atol=1e-4)


def test_responses_stop_after_eos():
    from opd.engines.rollout import _cut_at_eos

    assert _cut_at_eos(torch.tensor([5, 6, 0, 0, 7]), eos_id=0) == 3  # EOS kept as a supervised token
    assert _cut_at_eos(torch.tensor([5, 6]), eos_id=0) == 2


def test_char_offsets_tile_the_text(tiny_world):
    tok = tiny_world["tokenizer"]
    ids = tok("3 plus 4 is 7. The answer is 7. é")["input_ids"] + [tok.eos_token_id]
    text, spans = token_char_offsets(tok, ids)
    assert text == "3 plus 4 is 7. The answer is 7. é"
    assert spans[0][0] == 0 and spans[-1] == (len(text), len(text))  # EOS has zero width
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    rollout_main(["--model-dir", str(tiny_world["student"]), "--world", "miniature", "--prompts", str(tiny_world["prompts"]),
                  "--out", str(d / "r.safetensors"), "--n-prompts", "3", "--samples", "2", "--top-k", str(K),
                  "--max-new-tokens", "20"])
    score_main(["--rollouts", str(d / "r.safetensors"), "--teacher", str(tiny_world["teacher"]),
                "--student", str(tiny_world["student"]), "--out", str(d / "s.safetensors"), "--top-k", str(K)])
    return d


def test_rollout_and_score_files(files):
    r = Rollouts.load(files / "r.safetensors")
    assert r.ids[:2] == ["prompts-arith2-00000#0", "prompts-arith2-00000#1"] and len(r.ids) == 6
    s = load_scores(files / "s.safetensors", r, files / "r.safetensors")
    n = int(r.tensors["offsets_B1"][-1])
    assert s["t_on_s_logprobs_NK"].shape == (n, K) and s["s_on_t_logprobs_NK"].shape == (n, K)
    # compact: within the bound 16·(2K + 4) bytes per token (K = 4 -> 192)
    assert (files / "s.safetensors").stat().st_size / n <= 16 * (2 * K + 4) + 4096 / n


def test_self_scoring_gives_the_student_back(tiny_world, student, files):
    """Teacher = student: teacher logprobs equal the stored student ones, and D = 0 exactly."""
    r = Rollouts.load(files / "r.safetensors")
    s = score_rollouts(student, r, K, batch_size=4, student=student)
    assert torch.allclose(s["t_logprob_N"], r.tensors["s_logprob_N"], atol=1e-4)
    assert torch.allclose(s["t_on_s_logprobs_NK"], r.tensors["s_topk_logprobs_NK"], atol=1e-4)
    assert torch.equal(s["t_topk_ids_NK"].long(), r.tensors["s_topk_ids_NK"].long())
    sig = batch_signals(r.tensors, s)
    assert sig.disagreement_BT[sig.valid_BT].abs().max() < 1e-4
    assert torch.allclose(sig.compatibility_BT[sig.valid_BT],
                          r.tensors["s_topk_logprobs_NK"].exp().sum(-1), atol=1e-4)


def test_scores_of_other_rollouts_are_refused(tiny_world, files, tmp_path):
    r = Rollouts.load(files / "r.safetensors")
    other = Rollouts(r.ids[:-1] + ["x#9"], r.tensors, r.meta)
    with pytest.raises(store.StoreError, match="does not score .*rollout ids differ.*index 5"):
        load_scores(files / "s.safetensors", other, "other.safetensors")
    t = dict(r.tensors)
    t["tokens_N"] = t["tokens_N"].clone()
    t["tokens_N"][0] += 1
    with pytest.raises(store.StoreError, match="other tokens"):
        load_scores(files / "s.safetensors", Rollouts(r.ids, t, r.meta), "edited")


def test_tokenizer_mismatch_is_refused(tiny_world):
    from opd.worlds.miniature import generator as toy
    from opd.worlds.miniature.tokenizer import train_tokenizer

    tok = tiny_world["tokenizer"]
    other = train_tokenizer([p + t for p, t in toy.iter_problems(toy.generate("reverse", 40, 1, "x"))], 300)
    with pytest.raises(TokenizerMismatch, match="tokenizers of student and teacher differ on regular"):
        pair_tokenizers(other, tok)
    assert pair_tokenizers(tok, tok).same  # (pairs across chat templates: tests/test_pairing.py)


def test_model_generation_defaults_do_not_truncate_sampling(tiny_world):
    """A hub model's generation_config (Qwen3: top_k=20, temperature 0.6) must not change our sampling."""
    tok = tiny_world["tokenizer"]
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    hub_like = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    hub_like.generation_config.top_k = 1  # would make sampling greedy if it leaked through
    hub_like.generation_config.temperature = 0.01
    a = generate_hf(plain, tok, _prompts(tok, 4), K, 1.0, 1.0, 16, seed=7, batch_size=4)
    b = generate_hf(hub_like, tok, _prompts(tok, 4), K, 1.0, 1.0, 16, seed=7, batch_size=4)
    assert torch.equal(a["tokens_N"], b["tokens_N"])
    assert not torch.equal(a["tokens_N"], a["s_topk_ids_NK"][:, 0])  # really sampled, not greedy


@pytest.mark.parametrize("variant, headline", [("paper", "gain_abs"), ("official", "gain_rel")])
def test_fixed_context_follows_the_signal_variant(tiny_world, files, tmp_path, variant, headline, monkeypatch):
    """opd.studies.fixed_context --signal-variant: `gain` is the variant's gain (absolute / relative)."""
    import csv

    from opd.studies import fixed_context

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "fc.csv"
    fixed_context.main(["--rollouts", str(files / "r.safetensors"), "--scores", str(files / "s.safetensors"),
                        "--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
                        "--out", str(out), "--selectors", "ta_opd", "dincompat_high", "random", "--ratio", "0.2",
                        "--steps", "1", "--signal-variant", variant, "--study", "test_fc"])
    rows = list(csv.DictReader(out.open()))
    assert [r["selector"] for r in rows] == ["ta_opd", "dincompat_high", "random"]
    assert all(float(r["gain"]) == float(r[headline]) for r in rows)
    n = int(rows[0]["n_positions"])  # paper: ⌈0.2 N − 1e-9⌉; official: exact ⌈0.2 N⌉ plus the min-keep top-up
    assert all(int(r["n_selected"]) >= -(-n // 5) for r in rows)


def test_fixed_context_gradient_checkpointing_gives_the_same_gains(tiny_world, files, tmp_path, monkeypatch):
    """--gradient-checkpointing recomputes the τ steps' layers: the same arithmetic, so the same CSV bytes;
    and S0 (moved to the host after its KL pass) is not changed by the selectors' training."""
    from opd.studies import fixed_context

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    seen = []
    real = fixed_context.trained_copy
    def spy(student, device, checkpointing):
        model = real(student, device, checkpointing)
        seen.append((student, model.is_activation_checkpointing))
        return model

    monkeypatch.setattr(fixed_context, "trained_copy", spy)
    argv = ["--rollouts", str(files / "r.safetensors"), "--scores", str(files / "s.safetensors"),
            "--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
            "--selectors", "ta_opd", "full", "--ratio", "0.2", "--steps", "2", "--study", "test_fc"]
    fixed_context.main([*argv, "--out", str(tmp_path / "plain.csv")])
    fixed_context.main([*argv, "--out", str(tmp_path / "ckpt.csv"), "--gradient-checkpointing"])
    assert [c for _, c in seen] == [False, False, True, True]
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "ckpt.csv").read_bytes()
    s0 = seen[0][0].state_dict()
    assert all(torch.equal(v, seen[1][0].state_dict()[k]) for k, v in s0.items())

