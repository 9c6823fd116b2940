"""What the planners read from a study config besides its settings: the models' shapes and a pair's GPUs.

Shared by the memory planner (opd.studies.plan) and the cost planner (opd.studies.cost), so both read a
model's shape one way: `<results_dir>/models/<name>/config.json` when it is on disk, else the model's
`shape` block over the table of `opd.studies.hub_shapes` (a miniature model: its architecture keys); a
`shape` key that contradicts config.json is an error. Pure Python (no torch).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from opd.studies.hub_shapes import hub_shape

GIB = 2 ** 30
NEEDS_SHAPE = "the memory and cost planners need the model's shape"
VLLM_ROLLOUT_FRACTION = 0.85  # opd.engines.rollout's vLLM gpu_memory_utilization
HF_GENERATE_SEQS = 64  # sequences per hf generate() call (opd.engines.rollout --batch-size default)
PROMPT_TOKENS = 1024  # the longest prompt the paper study allows (docs/paper.md): a bound, not a mean
HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim", "intermediate_size", "tie_word_embeddings")
MINIATURE_KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "layers", "num_attention_heads": "heads",
                  "num_key_value_heads": "kv_heads", "intermediate_size": "intermediate_size", "head_dim": "head_dim"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """What memory depends on in a Qwen3-style decoder (names as in a Hugging Face config.json)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = True

    @property
    def q(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_params(self) -> int:
        H = self.hidden_size
        return 2 * H * self.q + 2 * H * self.kv + 3 * H * self.intermediate_size + 2 * H + 2 * self.head_dim

    def root_params(self) -> int:
        """Embeddings, final norm and (untied) LM head: FSDP's root group."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def params(self) -> int:
        return self.root_params() + self.num_hidden_layers * self.layer_params()

    def layer_elements(self) -> int:
        """Elements per token one decoder layer keeps for backward (eager attention-free count, SDPA):
        each RMSNorm its input, normalised and scaled outputs (3H twice); q/k/v and their norms, rotary and
        GQA-repeated copies, attention output (8q + 4kv); SwiGLU gate, activation, up and product (4I)."""
        return 6 * self.hidden_size + 8 * self.q + 4 * self.kv + 4 * self.intermediate_size


def shape_from_config_json(path: Path) -> dict:
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    out = {k: cfg[k] for k in HF_KEYS if k in cfg}
    out.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    out.setdefault("tie_word_embeddings", False)
    return out


def model_shape(config: dict, name: str) -> tuple[Shape | None, list[str]]:
    """(the model's Shape or None, problems): config.json on disk first, then the config's shape keys."""
    model = config["models"][name]
    given = {**hub_shape(model.get("hub")), **(model.get("shape") or {})}  # the table, then the shape keys
    if not model.get("hub"):  # a miniature model: its architecture keys and the world's vocabulary cap
        given.update({hf: model[k] for hf, k in MINIATURE_KEYS.items() if model.get(k) is not None})
        given.setdefault("vocab_size", config.get("world", {}).get("vocab_size", 512))
        given.setdefault("head_dim", model.get("hidden_size", 0) // max(1, model.get("heads", 1)))
    on_disk = Path(config.get("results_dir", "results")) / "models" / name / "config.json"
    if on_disk.is_file():
        found = shape_from_config_json(on_disk)
        wrong = [f"models.{name}.shape.{k}: {v!r} contradicts {k}={found[k]!r} in {on_disk}"
                 for k, v in (model.get("shape") or {}).items() if k in found and found[k] != v]
        if wrong:
            return None, wrong
        given = {**given, **found}
    missing = [k for k in HF_KEYS[:-1] if k not in given]
    if missing:
        return None, [f"models.{name}: no {on_disk} and no models.{name}.shape keys {', '.join(missing)}: "
                      + NEEDS_SHAPE]
    return Shape(**{k: given[k] for k in HF_KEYS if k in given}), []



def pair_gpus(config: dict, teacher: str, student: str) -> int:
    """GPUs of a pair's training jobs: its train.pairs entry's `gpu`, else resources.train.gpu."""
    given = [p.get("gpu") for p in config["train"].get("pairs") or []
             if (p["teacher"], p["student"]) == (teacher, student)]
    return next((g for g in given if g), config["resources"]["train"]["gpu"])
