"""Paper-scale memory: chunked LM head, micro-batched update, token-budget scoring, generate_hf's recorder.

Every memory device must leave the numbers as they were: chunked == unchunked, micro-batched == one batch
(also under DDP), the recorder == transformers' own output_logits.
"""

import argparse
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from opd.engines import distributed, forward, train, update
from opd.engines.rollout import Rollouts, generate_hf
from opd.engines.score import score_rollouts
from opd.math.release import release_mask

K = 4
# Weights after one SGD step (lr 0.1) on gradients summed in another order: float32 rounding only.
WEIGHT_ATOL = 1e-7


def _argv(world, out, *extra):
    return ["--student", str(world["student"]), "--teacher", str(world["teacher"]), "--world", "miniature",
            "--prompts", str(world["prompts"]), "--out-dir", str(out), "--top-k", str(K), "--prompts-per-step", "3",
            "--samples", "2", "--max-new-tokens", "14", "--threads", "1", "--method", "full", *extra]


@pytest.fixture(scope="module")
def batch(tiny_world, tmp_path_factory):
    """A Trainer and one step's rollouts and teacher scores (exact mode)."""
    tr = train.setup(train.parse_args(_argv(tiny_world, tmp_path_factory.mktemp("mem"))))
    rollouts, _ = train.sample(tr, t=1)
    scores = score_rollouts(tr.teacher, rollouts, K, 64, student=tr.student)
    return tr, rollouts, scores


def _stepped_weights(tr, rollouts, scores, mask_BT, **flags) -> list[torch.Tensor]:
    """The student's weights after one update with these flags, from (and back to) the same start."""
    start, args = {k: v.clone() for k, v in tr.student.state_dict().items()}, tr.args
    tr.args = argparse.Namespace(**{**vars(tr.args), **flags})
    tr.optimizer = torch.optim.SGD(tr.student.parameters(), lr=0.1)
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
    update.update_step(tr, rollouts, scores, mask_BT, step=1)
    after = [p.detach().clone() for p in tr.student.parameters()]
    tr.student.load_state_dict(start)
    tr.args = args
    return after


def _masks(rollouts, valid_BT):
    """Every valid position; and a release-style truncation (one rollout cut early, one with nothing)."""
    lengths = (rollouts.tensors["offsets_B1"][1:] - rollouts.tensors["offsets_B1"][:-1]).tolist()
    release_B = [max(1, n // 3) if b % 3 == 0 else (0 if b % 3 == 1 else None) for b, n in enumerate(lengths)]
    return {"full": valid_BT, "released": release_mask(valid_BT, release_B)}


def _valid(rollouts):
    lengths = rollouts.tensors["offsets_B1"][1:] - rollouts.tensors["offsets_B1"][:-1]
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]


@pytest.mark.parametrize("loss", ["pg", "topk_reverse_kl", "topk_forward_kl", "topk_jsd"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("masking", ["full", "released"])
def test_micro_batched_update_equals_one_batch(batch, loss, aggregation, masking):
    tr, rollouts, scores = batch
    mask_BT = _masks(rollouts, _valid(rollouts))[masking]
    seqs = rollouts.sequences()
    budget = max(len(p) + int(m.nonzero()[-1]) + 1 for (p, _), m in zip(seqs, mask_BT) if m.any())
    assert len(update.micro_batches(seqs, mask_BT, budget)) >= 3  # really split
    one = _stepped_weights(tr, rollouts, scores, mask_BT, loss=loss, aggregation=aggregation,
                           max_tokens_per_microbatch=10**6, logit_chunk=10**6)
    many = _stepped_weights(tr, rollouts, scores, mask_BT, loss=loss, aggregation=aggregation,
                            max_tokens_per_microbatch=budget, logit_chunk=3)
    assert any(not torch.equal(a, b) for a, b in zip(one, tr.student.parameters()))  # the step moved weights
    assert max(float((a - b).abs().max()) for a, b in zip(one, many)) <= WEIGHT_ATOL


def _saved_for_backward(model) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.train().model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    return len(saved)


def test_gradient_checkpointing_gives_the_same_step(batch, tiny_world, tmp_path):
    tr, rollouts, scores = batch
    mask_BT = _valid(rollouts)
    plain = _stepped_weights(tr, rollouts, scores, mask_BT, loss="pg", aggregation="token_mean")
    kept = _saved_for_backward(tr.student)
    checkpointed = train.setup(train.parse_args(_argv(tiny_world, tmp_path, "--gradient-checkpointing")))
    assert _saved_for_backward(checkpointed.student) < kept / 3  # the layers' activations are not kept
    tr.student, student = checkpointed.student, tr.student
    try:
        again = _stepped_weights(tr, rollouts, scores, mask_BT, loss="pg", aggregation="token_mean")
    finally:
        tr.student = student
    assert all(torch.equal(a, b) for a, b in zip(plain, again))  # recomputation is the same arithmetic


def test_micro_batches_hold_the_budget_and_every_supervised_token_once(batch):
    _, rollouts, _ = batch
    seqs, mask_BT = rollouts.sequences(), _masks(rollouts, _valid(rollouts))["released"]
    longest = max(len(p) + len(r) for p, r in seqs)
    mbs = update.micro_batches(seqs, mask_BT, longest + 5)
    assert len(mbs) >= 2
    for mb in mbs:
        assert len(mb.prompts) * max(len(p) + len(r) for p, r in zip(mb.prompts, mb.responses)) <= longest + 5
        assert int(mb.keep_N.sum()) == len(mb.pos_M) == len(mb.seq_M)
    flat_mask_N = torch.cat([m[: len(r)] for m, (_, r) in zip(mask_BT, seqs)])
    assert sorted(torch.cat([mb.pos_M for mb in mbs]).tolist()) == flat_mask_N.nonzero()[:, 0].tolist()
    with pytest.raises(ValueError, match="does not fit --max-tokens-per-microbatch"):
        update.micro_batches(seqs, mask_BT, 10)  # shorter than any prompt + 1 token


def test_chunked_scoring_equals_unchunked(batch):
    tr, rollouts, _ = batch
    ref = score_rollouts(tr.teacher, rollouts, K, 64, student=tr.student, logit_chunk=10**6, max_tokens=10**6)
    longest = max(len(p) + len(r) for p, r in rollouts.sequences())
    for chunk, budget in ((1, 10**6), (7, 2 * longest), (None, longest)):
        got = score_rollouts(tr.teacher, rollouts, K, 64, student=tr.student, logit_chunk=chunk, max_tokens=budget)
        assert torch.equal(got["t_topk_ids_NK"], ref["t_topk_ids_NK"])
        for key in ("t_logprob_N", "t_on_s_logprobs_NK", "t_topk_logprobs_NK", "s_on_t_logprobs_NK"):
            assert torch.allclose(got[key], ref[key], atol=1e-6, rtol=0), key
    # the reference itself is the plain full-vocabulary computation, one sequence at a time
    (p, r), = rollouts.sequences()[:1]
    with torch.no_grad():
        logp_TV = torch.log_softmax(tr.teacher(torch.tensor([p + r])).logits[0, len(p) - 1:-1], -1)
    assert torch.allclose(ref["t_logprob_N"][: len(r)], logp_TV.gather(-1, torch.tensor(r)[:, None])[:, 0], atol=1e-5)


def test_backward_through_the_chunked_head_saves_no_vocabulary_rows():
    """Under checkpointing, what a chunk saves for backward is its [chunk, H] input, never [chunk, V] logits."""
    torch.manual_seed(0)
    head, V = torch.nn.Linear(8, 500, bias=False), 500
    hidden_MH = torch.randn(30, 8, requires_grad=True)
    ids_M = torch.randint(0, V, (30,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        (lp_M,), _ = forward.head_map(head, hidden_MH, forward.sampled_logprob, (ids_M,), chunk=4)
    assert saved and not any(V in shape for shape in saved)
    lp_M.sum().backward()  # and the gradient is that of the plain computation
    h2 = hidden_MH.detach().clone().requires_grad_(True)
    torch.log_softmax(head(h2), -1).gather(-1, ids_M[:, None]).sum().backward()
    assert torch.allclose(hidden_MH.grad, h2.grad, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_hf_records_what_output_logits_gives(tiny_world, temperature):
    """The recorder's top-K and sampled logprobs equal those from transformers' [B, T, V] output_logits."""
    tok = tiny_world["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["student"])).eval()
    prompts = [tok(f"Question: Start with {i}. Add 2.\nAnswer:")["input_ids"] for i in range(3)]
    got = generate_hf(model, tok, prompts, K, temperature, 0.9, 12, seed=11, batch_size=3)
    torch.manual_seed(11)
    P = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.9} if temperature else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=12, top_k=0, min_p=0.0, repetition_penalty=1.0, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, **sampling)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id) | (torch.arange(P) >= P - 1),
                             generation_config=config)
    logp_BTV = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
    seq_BT = out.sequences[:, P:]
    rollouts = Rollouts([str(i) for i in range(3)], got)
    for b, (_, response) in enumerate(rollouts.sequences()):
        lo, n = int(got["offsets_B1"][b]), len(response)
        assert response == seq_BT[b, :n].tolist()
        assert torch.equal(got["s_logprob_N"][lo:lo + n], logp_BTV[b, :n].gather(-1, seq_BT[b, :n, None])[:, 0])
        top = logp_BTV[b, :n].topk(K, -1)
        assert torch.equal(got["s_topk_ids_NK"][lo:lo + n].long(), top.indices)
        assert torch.equal(got["s_topk_logprobs_NK"][lo:lo + n], top.values)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_head_map_finite_flag(bad):
    """The all-logits-finite flag (min/max reduction, no [chunk, V] mask) is False for one NaN/±inf logit in
    any chunk, True otherwise, and True for an empty batch."""
    head = torch.nn.Linear(2, 6, bias=False)
    hidden_MH = torch.randn(7, 2)
    if bad is not None:
        with torch.no_grad():
            head.weight[4, 0] = bad  # logit 4 of the positions whose hidden[0] != 0: every position
    _, finite = forward.head_map(head, hidden_MH, forward.sampled_logprob, (torch.zeros(7, dtype=torch.long),), 3)
    assert bool(finite) is (bad is None)
    _, finite = forward.head_map(head, hidden_MH[:0], forward.sampled_logprob, (torch.zeros(0, dtype=torch.long),), 3)
    assert bool(finite)


def test_default_chunk_never_splits_the_miniature():
    """The miniature's numbers stay bit-identical only if its batches are one LM-head chunk: 2**28 bytes of
    float32 logits = 131,072 positions at V = 512, above its largest batch (diagnose: 64 prompts x 4 samples
    x 160 tokens = 40,960 positions; the fixed-context bank <= 256 x 198 = 50,688); 441 at Qwen3's 151,936."""
    import yaml

    cfg = yaml.safe_load(open("config/config.yaml"))
    d, t = cfg["diagnose"], cfg["train"]
    largest = max(d["n_prompts"] * d["samples"] * d["max_new_tokens"], 256 * 198,
                  t["prompts_per_step"] * t["samples"] * t["max_new_tokens"])
    assert forward.chunk_positions(None, cfg["world"]["vocab_size"]) == 131_072 > largest == 50_688
    assert forward.chunk_positions(None, 151_936) == 441


def test_recorder_writes_in_place_and_stops_early():
    """3 steps of a 5-step budget: the [B, V] and [B, T, K] buffers are allocated once (no per-step blocks to
    fragment the heap) and finish() returns the 3 steps' logprobs and top-2 worked out by hand."""
    from opd.engines.rollout import TopKRecorder

    rec = TopKRecorder(2, max_new_tokens=5)
    scores = [torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]), torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
              torch.tensor([[0.5, 0.0, 1.0], [1.0, 2.0, 3.0]])]
    seq_BT = torch.tensor([[2, 0, 1], [0, 1, 2]])
    ptrs = set()
    for t, s_BV in enumerate(scores):
        assert rec(seq_BT[:, :t], s_BV) is s_BV  # the scores go on untouched
        ptrs.add((rec.logp_BV.data_ptr(), rec.top_ids_BTK.data_ptr()))
    assert len(ptrs) == 1
    lp_BT, ids_BTK, lps_BTK = rec.finish(seq_BT)
    logp_BTV = torch.log_softmax(torch.stack(scores, 1), -1)
    assert torch.equal(lp_BT, logp_BTV.gather(-1, seq_BT[..., None])[..., 0])
    assert ids_BTK.shape == (2, 3, 2) and ids_BTK[0].tolist() == [[2, 1], [0, 1], [2, 0]]
    assert torch.equal(lps_BTK, logp_BTV.topk(2, -1).values)


def test_bad_memory_flags_name_the_flag(tiny_world, tmp_path):
    with pytest.raises(ValueError, match=r"--logit-chunk: 0 .*train\.logit_chunk"):
        train.check_args(train.parse_args(_argv(tiny_world, tmp_path, "--logit-chunk", "0")))
    with pytest.raises(ValueError, match="--logit-chunk .* must be >= 1, got 0"):  # the engines' own check
        forward.chunk_positions(0, 100)
    with pytest.raises(ValueError, match=r"--max-tokens-per-microbatch \(train.max_tokens_per_microbatch\) 20 < "
                                         r"the longest prompt"):
        train.setup(train.parse_args(_argv(tiny_world, tmp_path, "--max-tokens-per-microbatch", "20")))
    from opd.infra.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="train.logit_chunk"):
        validate_config({"train": {"logit_chunk": 0}})


def _ddp_rank(rank: int, port: int, world_dir: str, data: str, out: str) -> None:
    """One of two gloo ranks: the update of its half of the batch through DDP, in micro-batches."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        d = torch.load(data, weights_only=True)
        paths = {"student": f"{world_dir}/student", "teacher": f"{world_dir}/teacher",
                 "prompts": f"{world_dir}/prompts.jsonl"}
        tr = train.setup(train.parse_args(_argv(paths, out, "--prompts-per-step", "2")), ctx=distributed.Context(rank, 2))
        half = d["halves"][rank]
        rollouts = Rollouts([str(i) for i in range(len(half["offsets_B1"]) - 1)], half)
        weights = _stepped_weights(tr, rollouts, d["scores"][rank], d["masks"][rank], max_tokens_per_microbatch=45,
                                   logit_chunk=5, loss="pg", aggregation=d["aggregation"])
        if rank == 0:
            torch.save(weights, f"{out}/weights.pt")
    finally:
        dist.destroy_process_group()


def _subset(rollouts, scores, rows):
    """The rollout and score tensors of some rows of a batch (one rank's share)."""
    seqs, o = rollouts.sequences(), rollouts.tensors["offsets_B1"]
    flat = torch.cat([torch.arange(int(o[b]), int(o[b + 1])) for b in rows])
    t = {k: v[flat] for k, v in rollouts.tensors.items() if k.endswith(("_N", "_NK"))}
    t["offsets_B1"] = torch.tensor([0] + [len(seqs[b][1]) for b in rows]).cumsum(0)
    t["prompt_offsets_B1"] = torch.tensor([0] + [len(seqs[b][0]) for b in rows]).cumsum(0)
    t["prompt_tokens_P"] = torch.tensor([x for b in rows for x in seqs[b][0]], dtype=torch.int32)
    return t, {k: v[flat] for k, v in scores.items() if k != "offsets_B1"}


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_micro_batches_under_ddp_give_the_global_batch_step(batch, tiny_world, tmp_path, aggregation):
    """2 gloo ranks, each its half in several micro-batches (different counts per rank) == one process, one batch."""
    import torch.multiprocessing as mp

    tr, rollouts, scores = batch
    mask_BT = _masks(rollouts, _valid(rollouts))["released"]
    B = len(rollouts.ids)
    shares = [list(range(0, B // 2)), list(range(B // 2, B))]
    halves = [_subset(rollouts, scores, rows) for rows in shares]
    torch.save({"halves": [h for h, _ in halves], "scores": [s for _, s in halves], "aggregation": aggregation,
                "masks": [mask_BT[rows] for rows in shares]}, tmp_path / "data.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world_dir = str(tiny_world["student"].parent)
    mp.start_processes(_ddp_rank, args=(port, world_dir, str(tmp_path / "data.pt"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    ddp = torch.load(tmp_path / "weights.pt", weights_only=True)
    one = _stepped_weights(tr, rollouts, scores, mask_BT, loss="pg", aggregation=aggregation,
                           max_tokens_per_microbatch=10**6, logit_chunk=None)
    assert max(float((a - b).abs().max()) for a, b in zip(one, ddp)) <= WEIGHT_ATOL
