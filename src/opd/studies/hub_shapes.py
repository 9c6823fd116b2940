"""The shapes of the hub models the paper studies use, so the memory planner (opd.studies.plan) works
offline with no `shape` keys in the config and before any download.

Values are those of each model's public config.json on the Hugging Face hub (the names are config.json's).
A config's `models.<name>.shape` keys override this table, and a downloaded config.json overrides both
(and must agree with the `shape` keys). Sources (read 2026-12-06):
- Qwen3-1.7B / 4B / 8B: the values config/paper.yaml already carried (tests/test_plan.py checks them against
  the model cards' parameter counts).
- Qwen3-14B, Qwen2.5-14B, Qwen2.5-3B: their config.json files, as collected in
  github.com/citsjtu2020/LLM-Prof, sglang/Model_Config.md (Qwen3-14B: also the Megatron arguments of
  github.com/THUDM/slime, scripts/models/qwen3-14B.sh: 40 layers, hidden 5120, FFN 17408, 40 heads,
  8 query groups, kv-channels 128, untied).
- DeepSeek-R1-Distill-Qwen-14B is a fine-tune of Qwen2.5-14B and keeps its shapes (Qwen2ForCausalLM, hidden
  5120, 48 layers, 40 heads, 8 KV heads, FFN 13824, untied, 152,064 embedding rows): the planner uses them.
Qwen2.5 models have biases on q/k/v and no q/k norms; the planner's per-layer count (Qwen3's) differs from
theirs by under 0.01% of a layer.
"""

from __future__ import annotations

_QWEN3 = {"vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8}
_QWEN25_14B = {"vocab_size": 152064, "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
               "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 13824, "tie_word_embeddings": False}

HUB_SHAPES: dict[str, dict] = {
    "Qwen/Qwen3-1.7B": {**_QWEN3, "hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
                        "intermediate_size": 6144, "tie_word_embeddings": True},
    "Qwen/Qwen3-4B": {**_QWEN3, "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                      "intermediate_size": 9728, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                      "intermediate_size": 12288, "tie_word_embeddings": False},
    "Qwen/Qwen3-14B": {**_QWEN3, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                       "intermediate_size": 17408, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-14B": _QWEN25_14B,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _QWEN25_14B,
    "Qwen/Qwen2.5-3B": {"vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 11008,
                        "tie_word_embeddings": True},
}
HUB_SHAPES["Qwen/Qwen2.5-3B-Instruct"] = HUB_SHAPES["Qwen/Qwen2.5-3B"]


def hub_shape(hub: str | None) -> dict:
    """The table's shape of a hub id ({} when it is not in the table: the config's `shape` keys are then needed)."""
    return dict(HUB_SHAPES.get(hub or "", {}))
