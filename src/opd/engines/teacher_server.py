"""A teacher served apart from the trainer (`--teacher-placement server`, config `train.teacher_placement`).

The teacher runs as a vLLM OpenAI-compatible server (`vllm serve`, started by `opd.engines.serve_teacher` or
by hand; one server can serve every training job of its teacher, every rank of each). Each step the trainer
sends its rollouts (prompt + response token ids, as rendered for the teacher) to `POST /v1/completions` with
`prompt_logprobs: K` and `max_tokens: 1`, and reads back, per response position, the log-probability of the
token that is there and the teacher's top-K ids and log-probabilities (vLLM's prompt log-probabilities; the
server must be started with `--max-logprobs` >= K). The one generated token is thrown away.

What vLLM 0.32 returns per prompt position is the top-K entries plus the token at that position, nothing
else: no log-probability at ids of our choosing, no hidden states through this API. So a served teacher
gives the top-K signals (C as the top-K lower bound, D on the top-K with the floor: TA-OPD's official
variant) and the sampled-token loss, but not log p_T at the student's top-K ids (`t_on_s_logprobs_NK`,
returned as NaN = unknown): exact C or D, the release rule's margin and the `topk_reverse_kl` loss need it
and are refused before any step (`check_args`, `config_problems`).

Requests: `batch_size` sequences per request, `concurrency` requests in flight (threads); a dropped
connection (refused, reset, closed) is retried `RETRIES` times with a short back-off; no answer within
`timeout` seconds, or no server after the retries, stops the step with one ServerError naming the URL.
Pre-flight (`ServedTeacher.check`, before the first step): the URL answers, it serves the config's teacher
(the served model's name is the teacher's directory name or path, and the server's tokenizer encodes a probe
text as the trainer's tokenizer does), and K is within the server's log-probability limit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from opd.infra.io import InputError

if TYPE_CHECKING:  # no torch at import: the workflow imports this module's config check while it parses
    from torch import Tensor

    from opd.engines.rollout import Rollouts

RETRIES, BACKOFF_S = 3, 1.0
PROBE_TEXT = "Question: Start with 12. Add 3, then multiply by 4. What is the result?\nAnswer: 60"
# What needs log p_T at the student's top-K ids, which a served teacher cannot give: flag -> (config key, value).
NEEDS_T_ON_S = {"signal_compatibility": ("signals.compatibility", "exact"),
                "signal_disagreement": ("signals.disagreement", "exact"),
                "loss": ("train.loss", "topk_reverse_kl")}
RELEASE_METHODS = ("release", "release+ta_opd")  # opd.engines.train's: the margin reads t_on_s


class ServerError(InputError, RuntimeError):
    """The teacher server (train.teacher_url) did not answer, or answered with an error; the message names the
    URL. An InputError: `python -m opd.engines.train` prints it in one line (opd.infra.cli.run)."""


class _Dropped(Exception):
    """A connection refused, reset or closed before the answer: worth retrying."""


def add_args(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--teacher-url", default=None,
      help="with --teacher-placement server: base URL of the vLLM server of the teacher (http://HOST:PORT)")
    a("--teacher-timeout", type=float, default=300.0,
      help="seconds one scoring request to the teacher server may take before the step stops with an error")
    a("--teacher-concurrency", type=int, default=4, help="scoring requests in flight at once to the teacher server")


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any step, what a served teacher cannot score, and a server placement without a URL."""
    if getattr(args, "teacher_placement", "in_process") != "server":
        return
    if not args.teacher_url:
        raise ValueError("--teacher-placement server (train.teacher_placement) needs --teacher-url "
                         "(train.teacher_url): the base URL of the teacher's vLLM server")
    if args.teacher_timeout <= 0 or args.teacher_concurrency < 1:
        raise ValueError(f"--teacher-timeout (train.teacher_timeout) must be > 0 and --teacher-concurrency "
                         f"(train.teacher_concurrency) >= 1, got {args.teacher_timeout} and {args.teacher_concurrency}")
    for dest, (key, bad) in NEEDS_T_ON_S.items():
        if getattr(args, dest, None) == bad:
            raise ValueError(f"--{dest.replace('_', '-')} {bad} ({key}: {bad}) needs log p_T at the student's top-K "
                             f"ids, which a vLLM server does not return: not with --teacher-placement server "
                             f"(train.teacher_placement: server); use the top-K signals (signals.variant: official)")
    if args.method in RELEASE_METHODS:
        raise ValueError(f"--method {args.method} (train.methods) needs the teacher margin over the student's "
                         f"top-K ids, which a vLLM server does not return: not with --teacher-placement server "
                         f"(train.teacher_placement: server)")


def config_problems(config: dict, teachers: list[str]) -> list[str]:
    """With `train.teacher_placement: server`: what it cannot score, and a URL for each of `teachers`."""
    from opd.math import variant

    train = config.get("train", {})
    if train.get("teacher_placement") != "server":
        return []
    signals = config.get("signals", {})
    try:
        opts, _ = variant.resolve(signals.get("variant", "paper"),
                                  **{k: v for k, v in signals.items() if k in variant.KEYS})
    except ValueError:
        return []  # the signals' own check says what is wrong
    where = "train.teacher_placement: server"
    problems = [f"signals.{key}: exact (signals.variant: {config.get('signals', {}).get('variant', 'paper')}) needs "
                f"log p_T at the student's top-K ids, which a vLLM server does not return: not with {where}; "
                f"use signals.variant: official or signals.{key}: topk"
                for key in ("compatibility", "disagreement") if getattr(opts, key) == "exact"]
    if train.get("loss") == "topk_reverse_kl":
        problems.append(f"train.loss: topk_reverse_kl needs log p_T at the student's top-K ids: not with {where}")
    problems += [f"train.methods: {m} needs the teacher margin over the student's top-K ids: not with {where}"
                 for m in train.get("methods", []) if m in RELEASE_METHODS]
    url = train.get("teacher_url")
    if not url:
        problems.append(f"train.teacher_url: needed with {where} (the teacher's vLLM server, "
                        f"python -m opd.engines.serve_teacher)")
    elif isinstance(url, dict):
        problems += [f"train.teacher_url: no URL for teacher {t!r} (given for {sorted(url)})"
                     for t in dict.fromkeys(teachers) if t not in url]
    return problems


def _http(url: str, path: str, body: dict | None, timeout: float) -> dict:
    """One JSON request; _Dropped when the connection fails, ServerError on a timeout or an HTTP error."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", {}).get("message", detail)
        except (ValueError, AttributeError):
            pass
        raise ServerError(f"the teacher server {url} answered {path} with HTTP {err.code}: {detail}") from None
    except (TimeoutError, socket.timeout) as err:
        raise ServerError(f"the teacher server {url} did not answer {path} within {timeout:g} s "
                          f"(train.teacher_timeout)") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise ServerError(f"the teacher server {url} did not answer {path} within {timeout:g} s "
                              f"(train.teacher_timeout)") from err
        raise _Dropped(str(err.reason)) from err
    except (ConnectionError, http.client.HTTPException) as err:
        raise _Dropped(repr(err)) from err


def request(url: str, path: str, body: dict | None = None, timeout: float = 30.0, retries: int = RETRIES) -> dict:
    """`_http` with a dropped connection retried `retries` times; then one ServerError naming the URL."""
    for attempt in range(retries + 1):
        try:
            return _http(url, path, body, timeout)
        except _Dropped as err:
            if attempt == retries:
                raise ServerError(f"the teacher server {url} does not answer {path} ({err}; {retries + 1} tries): "
                                  f"is it running? (train.teacher_url)") from None
            time.sleep(BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")


def read_positions(entries: list, sequence: list[int], start: int, K: int) -> tuple[list[float], list, list]:
    """Per position p >= start of `sequence`, from vLLM's prompt_logprobs (entry p: {id: {logprob, rank}}):
    log p_T(sequence[p]), and the top-K (ids, logprobs) by rank."""
    sampled, ids, lps = [], [], []
    for p in range(start, len(sequence)):
        entry = {int(k): v for k, v in entries[p].items()}
        sampled.append(float(entry[sequence[p]]["logprob"]))
        top = sorted((v["rank"], k, float(v["logprob"])) for k, v in entry.items() if v["rank"] <= K)[:K]
        if len(top) < K:
            raise ServerError(f"the teacher server returned {len(top)} top log-probabilities at position {p}, "
                              f"not K = {K}")
        ids.append([k for _, k, _ in top])
        lps.append([lp for _, _, lp in top])
    return sampled, ids, lps


class ServedTeacher:
    """The trainer's handle on a teacher server: `check(tokenizer, K)` once, then `score(rollouts, K, batch_size)`."""

    def __init__(self, url: str, teacher: Path, *, timeout: float = 300.0, concurrency: int = 4):
        self.url, self.teacher, self.timeout, self.concurrency = url.rstrip("/"), Path(teacher), timeout, concurrency
        self.model: str | None = None

    def check(self, tokenizer, K: int) -> None:
        """Pre-flight: the URL answers, it serves the config's teacher, K is within the server's limit."""
        served = [m["id"] for m in request(self.url, "/v1/models", timeout=min(self.timeout, 60.0))["data"]]
        names = {self.teacher.name, str(self.teacher), str(self.teacher.resolve())}
        match = [m for m in served if m in names or Path(m).name == self.teacher.name]
        if not match:
            raise ServerError(f"the teacher server {self.url} (train.teacher_url) serves {served}, not the teacher "
                              f"{self.teacher.name!r} ({self.teacher}): start it with --served-model-name "
                              f"{self.teacher.name}, or point train.teacher_url at that teacher's server")
        self.model = match[0]
        got = request(self.url, "/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False},
                      timeout=min(self.timeout, 60.0))["tokens"]
        want = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ServerError(f"the teacher server {self.url} (train.teacher_url) tokenizes a probe text otherwise "
                              f"than the teacher {self.teacher} ({got[:8]}... vs {want[:8]}...): another model")
        try:
            self._complete([want], K)
        except ServerError as err:
            raise ServerError(f"--top-k (train.top_k) {K} is refused by the teacher server {self.url}: start it with "
                              f"--max-logprobs >= {K} ({err})") from None

    def _complete(self, sequences: list[list[int]], K: int) -> list[list]:
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": K, "logprobs": None}
        choices = request(self.url, "/v1/completions", body, timeout=self.timeout)["choices"]
        return [c["prompt_logprobs"] for c in sorted(choices, key=lambda c: c["index"])]

    def score(self, rollouts: Rollouts, K: int, batch_size: int) -> dict[str, Tensor]:
        """The scoring tensors of `opd.engines.score` from the server (t_on_s_logprobs_NK: NaN, unknown)."""
        import torch

        seqs = rollouts.sequences()
        batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda b: self._complete([p + r for p, r in b], K), batches))
        sampled, ids, lps = [], [], []
        for batch, entries in zip(batches, answers):
            for (prompt, response), entry in zip(batch, entries):
                s, i, lp = read_positions(entry, prompt + response, len(prompt), K)
                sampled += s
                ids += i
                lps += lp
        n = len(sampled)
        return {"offsets_B1": rollouts.tensors["offsets_B1"].clone(),
                "t_logprob_N": torch.tensor(sampled, dtype=torch.float32),
                "t_on_s_logprobs_NK": torch.full((n, K), math.nan),
                "t_topk_ids_NK": torch.tensor(ids, dtype=torch.int32).reshape(n, K),
                "t_topk_logprobs_NK": torch.tensor(lps, dtype=torch.float32).reshape(n, K)}
