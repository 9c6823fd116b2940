"""`--recompute-rollout-logprobs`: the rollouts' student quantities from the trainer's forward."""

import torch
from transformers import AutoModelForCausalLM

from opd.engines import recompute
from opd.engines.forward import response_hidden
from opd.engines.rollout import Rollouts, generate_hf


def test_recomputed_old_logprobs_and_topk_equal_the_trainers_forward(tiny_world):
    tok, K = tiny_world["tokenizer"], 4
    student = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    prompts = [tok(f"Question: Start with {i}. Add 2. What is the result?\nAnswer:")["input_ids"] for i in range(4)]
    tensors = generate_hf(student, tok, prompts, K, 1.0, 1.0, 10, seed=5, batch_size=4)
    engine_lp = tensors["s_logprob_N"].clone()
    tensors["s_logprob_N"] = engine_lp + 0.25  # an "engine" whose logprobs are off by 0.25 everywhere
    rollouts = Rollouts([str(i) for i in range(4)], tensors)
    new, metrics = recompute.recompute(student, rollouts, K, batch_size=3)

    # what the update's forward (one pass over every sequence, no batching) gives
    seqs = rollouts.sequences()
    with torch.no_grad():
        logp_NV = torch.log_softmax(student.lm_head(response_hidden(student, [p for p, _ in seqs], [r for _, r in seqs])).float(), -1)
    tokens_N = tensors["tokens_N"].long()
    top = logp_NV.topk(K, -1)
    t = new.tensors
    assert torch.allclose(t["s_logprob_N"], logp_NV.gather(-1, tokens_N[:, None])[:, 0], atol=1e-5)
    assert torch.equal(t["s_topk_ids_NK"].long(), top.indices)
    assert torch.allclose(t["s_topk_logprobs_NK"], top.values, atol=1e-5)
    assert t["s_topk_ids_NK"].dtype == torch.int32 and t["s_topk_ids_NK"].shape == (len(tokens_N), K)
    assert torch.equal(t["engine_logprob_N"], engine_lp + 0.25) and torch.equal(t["tokens_N"], tensors["tokens_N"])
    # generate_hf's logprobs are the same model's: the mismatch is the 0.25 put in, up to float error
    assert abs(metrics["rollout_logprob_mismatch"] - 0.25) < 1e-4
    assert abs(metrics["rollout_logprob_mismatch_max"] - 0.25) < 1e-4


def test_training_with_recompute_logs_the_mismatch(tiny_world, tmp_path, monkeypatch):
    from opd.engines import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    final = train.main(["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]),
                        "--world", "miniature", "--prompts", str(tiny_world["prompts"]), "--out-dir", str(tmp_path / "o"),
                        "--method", "full", "--steps", "1", "--top-k", "4", "--prompts-per-step", "2", "--samples", "2",
                        "--max-new-tokens", "8", "--study", "test_recompute", "--recompute-rollout-logprobs"])
    # hf rollouts: generate()'s KV-cached logprobs vs one full forward of the same fp32 model
    assert 0.0 <= final["rollout_logprob_mismatch"] <= final["rollout_logprob_mismatch_max"] < 1e-4
