"""The served teacher's client (`--teacher-placement server`) against a stand-in of vLLM's API, without vLLM.

The stand-in (`FakeVllm`) answers /v1/models, /tokenize and /v1/completions with `prompt_logprobs` as vLLM
does, from the tiny Hugging Face teacher, and can misbehave on demand (another model name or tokenizer, a
log-probability limit, dropped connections, no answer). tests/test_vllm.py runs the real server.
"""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opd.engines import teacher_server as ts
from opd.engines.rollout import Rollouts, generate_hf
from opd.engines.score import score_rollouts


class FakeVllm:
    """vLLM's OpenAI-compatible API, in a thread, on 127.0.0.1: scores with `model` (Hugging Face)."""

    def __init__(self, model, tokenizer, name="teacher", max_logprobs=20):
        self.model, self.tokenizer, self.name, self.max_logprobs = model, tokenizer, name, max_logprobs
        self.drop, self.delay, self.completions, self.tokenize_shift = 0, 0.0, 0, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self._send(200, {"data": [{"id": fake.name}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    ids = fake.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
                    return self._send(200, {"tokens": [i + fake.tokenize_shift for i in ids]})
                fake.completions += 1
                if fake.drop > 0:
                    fake.drop -= 1
                    self.close_connection = True  # the connection closes with no answer
                    return
                time.sleep(fake.delay)
                if body["prompt_logprobs"] > fake.max_logprobs:
                    return self._send(400, {"error": {"message": f"Requested prompt logprobs of "
                                                      f"{body['prompt_logprobs']}, which is greater than max "
                                                      f"allowed: {fake.max_logprobs}"}})
                K = body["prompt_logprobs"]
                self._send(200, {"choices": [{"index": i, "prompt_logprobs": fake.entries(seq, K)}
                                             for i, seq in enumerate(body["prompt"])]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up (the timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @torch.no_grad()
    def entries(self, seq, K):
        logp = torch.log_softmax(self.model(torch.tensor([seq])).logits[0].float(), -1)
        out = [None]
        for p in range(1, len(seq)):
            top = logp[p - 1].topk(K)
            entry = {str(int(i)): {"logprob": float(v), "rank": r + 1}
                     for r, (v, i) in enumerate(zip(top.values, top.indices))}
            if str(seq[p]) not in entry:
                rank = int((logp[p - 1] > logp[p - 1, seq[p]]).sum()) + 1
                entry[str(seq[p])] = {"logprob": float(logp[p - 1, seq[p]]), "rank": rank}
            out.append(entry)
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def models(tiny_world):
    from transformers import AutoModelForCausalLM

    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d)).eval()  # noqa: E731
    return load(tiny_world["teacher"]), load(tiny_world["student"])


@pytest.fixture
def fake(tiny_world, models):
    server = FakeVllm(models[0], tiny_world["tokenizer"])
    yield server
    server.close()


def _rollouts(tiny_world, student, K=4, n=5):
    tok = tiny_world["tokenizer"]
    prompts = [tok(f"Question: Start with {i}. Add 3. What is the result?\nAnswer:")["input_ids"] for i in range(n)]
    tensors = generate_hf(student, tok, prompts, K, 1.0, 1.0, 12, seed=3, batch_size=n)
    return Rollouts([str(i) for i in range(n)], tensors)


def test_read_positions_takes_the_token_there_and_the_top_k_by_rank():
    # sequence [5, 7, 9], response from position 1: position 1's token 7 is outside the top-2 (rank 3),
    # position 2's token 9 is the top-1; the entries come in no particular order.
    entries = [None, {"2": {"logprob": -0.5, "rank": 1}, "7": {"logprob": -2.0, "rank": 3},
                      "4": {"logprob": -1.0, "rank": 2}},
               {"3": {"logprob": -1.5, "rank": 2}, "9": {"logprob": -0.25, "rank": 1}}]
    sampled, ids, lps = ts.read_positions(entries, [5, 7, 9], 1, 2)
    assert sampled == [-2.0, -0.25]
    assert ids == [[2, 4], [9, 3]] and lps == [[-0.5, -1.0], [-0.25, -1.5]]
    with pytest.raises(ts.ServerError, match="returned 2 top log-probabilities at position 2, not K = 3"):
        ts.read_positions(entries, [5, 7, 9], 2, 3)


def test_served_scores_equal_in_process_scores(tiny_world, models, fake):
    teacher, student = models
    rollouts = _rollouts(tiny_world, student)
    want = score_rollouts(teacher, rollouts, 4, 2)
    served = ts.ServedTeacher(fake.url, tiny_world["teacher"], timeout=30, concurrency=2)
    served.check(tiny_world["tokenizer"], 4)
    got = served.score(rollouts, 4, 2)  # batches of 2 sequences: 3 requests, 2 at a time
    assert fake.completions == 1 + 3  # the pre-flight's K probe, then one request per batch
    assert torch.equal(got["offsets_B1"], want["offsets_B1"])
    assert torch.equal(got["t_topk_ids_NK"], want["t_topk_ids_NK"])
    for key in ("t_logprob_N", "t_topk_logprobs_NK"):
        assert got[key].dtype == torch.float32 and torch.allclose(got[key], want[key], atol=1e-5), key
    assert got["t_on_s_logprobs_NK"].shape == want["t_on_s_logprobs_NK"].shape
    assert got["t_on_s_logprobs_NK"].isnan().all()  # unknown: nothing a served teacher allows reads it


@pytest.mark.parametrize("setup, match", [
    (lambda f: setattr(f, "name", "student"), r"serves \['student'\], not the teacher 'teacher'"),
    (lambda f: setattr(f, "tokenize_shift", 1), r"tokenizes a probe text otherwise than the teacher"),
    (lambda f: setattr(f, "max_logprobs", 3), r"--top-k \(train.top_k\) 4 is refused by the teacher server "
                                              r"http://127.0.0.1:\d+: start it with --max-logprobs >= 4 .*max allowed: 3"),
])
def test_preflight_refuses_another_model_or_a_k_over_the_limit(tiny_world, fake, setup, match):
    setup(fake)
    with pytest.raises(ts.ServerError, match=match):
        ts.ServedTeacher(fake.url, tiny_world["teacher"], timeout=30).check(tiny_world["tokenizer"], 4)


def test_a_url_that_does_not_answer_is_one_error_naming_it(tiny_world, fake, monkeypatch):
    monkeypatch.setattr(ts, "BACKOFF_S", 0.01)
    url = fake.url
    fake.close()  # nothing listens there any more
    with pytest.raises(ts.ServerError, match=rf"the teacher server {url} does not answer /v1/models \(.*4 tries\): "
                                             r"is it running\? \(train.teacher_url\)"):
        ts.ServedTeacher(url, tiny_world["teacher"]).check(tiny_world["tokenizer"], 4)


def test_dropped_connections_are_retried_and_a_slow_server_times_out(tiny_world, models, fake, monkeypatch):
    monkeypatch.setattr(ts, "BACKOFF_S", 0.01)
    rollouts = _rollouts(tiny_world, models[1], n=2)
    served = ts.ServedTeacher(fake.url, tiny_world["teacher"], timeout=5, concurrency=1)
    served.check(tiny_world["tokenizer"], 4)
    fake.drop, before = 2, fake.completions
    assert served.score(rollouts, 4, 8)["t_logprob_N"].shape == (int(rollouts.tensors["offsets_B1"][-1]),)
    assert fake.completions - before == 3  # two dropped, the third answered
    fake.delay, served.timeout = 2.0, 0.5
    start = time.monotonic()
    with pytest.raises(ts.ServerError, match=rf"the teacher server {fake.url} did not answer /v1/completions "
                                             r"within 0.5 s \(train.teacher_timeout\)"):
        served.score(rollouts, 4, 8)
    assert time.monotonic() - start < 2.0  # the timeout, not the server's delay


def _args(**kw):
    import argparse

    base = dict(teacher_placement="server", teacher_url="http://127.0.0.1:1", teacher_timeout=300.0,
                teacher_concurrency=4, signal_compatibility="topk", signal_disagreement="topk", loss="pg",
                method="ta_opd")
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(teacher_url=None), r"--teacher-placement server \(train.teacher_placement\) needs --teacher-url"),
    (dict(signal_compatibility="exact"), r"--signal-compatibility exact \(signals.compatibility: exact\) .*"
                                         r"not with --teacher-placement server \(train.teacher_placement: server\)"),
    (dict(signal_disagreement="exact"), r"--signal-disagreement exact \(signals.disagreement: exact\)"),
    (dict(loss="topk_reverse_kl"), r"--loss topk_reverse_kl \(train.loss: topk_reverse_kl\)"),
    (dict(method="release+ta_opd"), r"--method release\+ta_opd \(train.methods\) needs the teacher margin"),
])
def test_what_a_served_teacher_cannot_score_is_refused_before_any_step(kw, match):
    ts.check_args(_args())  # the top-K signals with the sampled-token loss: fine
    with pytest.raises(ValueError, match=match):
        ts.check_args(_args(**kw))


def test_config_with_a_served_teacher_is_checked_at_validation(repo):
    import copy

    import yaml

    from opd.infra.config import ConfigError, validate_config
    from opd.studies.validate import served_teacher_problems

    with open(repo / "config" / "config.yaml") as fh:
        raw = yaml.safe_load(fh)
    raw.setdefault("train", {})["teacher_placement"] = "server"
    with pytest.raises(ConfigError) as err:  # the paper variant: exact C and D
        validate_config(copy.deepcopy(raw), checks=[served_teacher_problems])
    text = str(err.value)
    assert "signals.compatibility: exact (signals.variant: paper) needs log p_T at the student's top-K ids" in text
    assert "not with train.teacher_placement: server" in text and "signals.disagreement: exact" in text
    assert "train.teacher_url: needed with train.teacher_placement: server" in text
    assert "train.methods: release needs the teacher margin" in text
    raw["signals"] = {"variant": "official"}
    raw["train"]["methods"] = ["full", "ta_opd"]
    teacher = next(n for n, m in raw["models"].items() if m.get("role") == "teacher")
    raw["train"]["teacher_url"] = {"other": "http://127.0.0.1:8000"}
    with pytest.raises(ConfigError, match=rf"train.teacher_url: no URL for teacher '{teacher}'"):
        validate_config(copy.deepcopy(raw), checks=[served_teacher_problems])
    raw["train"]["teacher_url"] = "http://127.0.0.1:8000"
    validate_config(copy.deepcopy(raw), checks=[served_teacher_problems])
    raw["train"]["teacher_url"] = "127.0.0.1:8000"  # no scheme
    with pytest.raises(ConfigError, match="teacher_url"):
        validate_config(copy.deepcopy(raw), checks=[served_teacher_problems])


def test_training_with_a_served_teacher_matches_in_process_training(tiny_world, tmp_path, fake, monkeypatch):
    from opd.engines import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    base = ["--student", str(tiny_world["student"]), "--teacher", str(tiny_world["teacher"]), "--world", "miniature",
            "--prompts", str(tiny_world["prompts"]), "--method", "ta_opd", "--ratio", "0.3", "--steps", "2",
            "--top-k", "4", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "10", "--lr", "1e-3",
            "--study", "test_teacher_server", "--batch-size", "3", "--signal-variant", "official"]
    a = train.main([*base, "--out-dir", str(tmp_path / "a")])
    b = train.main([*base, "--out-dir", str(tmp_path / "b"), "--teacher-placement", "server",
                    "--teacher-url", fake.url])
    assert a.keys() == b.keys() and fake.completions >= 3  # the probe, then each step's requests
    for key in ("loss", "reverse_kl_all", "frac_supervised", "train_accuracy"):
        assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), key


def test_the_planner_counts_a_served_teacher_on_its_server_not_in_training(repo):
    from opd.studies import plan

    files = [repo / "config" / "paper.yaml", repo / "config" / "served_teacher.yaml"]
    config = plan.load_config(files[:1])
    served = {e.job: e for e in plan.estimates(plan.load_config(files))[0]}
    local = {e.job: e for e in plan.estimates(config)[0]}
    job = "train qwen3_8b -> qwen3_1p7b"
    teacher = local[job].static["teacher"]
    assert teacher == 2 * plan.model_shape(config, "qwen3_8b")[0].params()  # bf16
    assert served[job].static["teacher"] == 0 and served[job].phases["scoring"] == 0
    assert served["serve qwen3_8b"].peak == teacher  # its weights (bf16); its KV cache takes what vLLM is given
    assert local[job].peak - served[job].peak == teacher  # scoring was not this job's largest phase
    assert "serve qwen3_8b" not in local
