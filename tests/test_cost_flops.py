"""The cost model's FLOPs (opd.studies.cost_model) against torch's FlopCounterMode on real Qwen3 models.

Each model is built from a Qwen3Config at a small width (CPU memory and time stay small) and run through the
engines' own forward (opd.engines.forward.supervised_map: the trunk over the whole sequence, the LM head a
chunk at a time at the response positions, each chunk under torch.utils.checkpoint when gradients flow),
forward only, forward + backward, and forward + backward with the decoder layers checkpointed
(opd.engines.forward.enable_checkpointing). On CPU, SDPA runs `_scaled_dot_product_flash_attention_for_cpu`,
which torch's flop registry does not list; it is counted here with torch's own SDPA formulas (the ones
FlopCounterMode applies to the CUDA flash and efficient kernels), so attention is counted as on a GPU.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd.engines import forward
from opd.studies import cost_model as cm
from opd.studies.shapes import Shape, shape_from_config_json

ATEN = torch.ops.aten


def _sdpa(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_SDPA = {ATEN._scaled_dot_product_flash_attention_for_cpu: _sdpa,
            ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}
# (config, prompt tokens, response tokens, sequences): three shapes, one with Qwen3's vocabulary 151,936 and
# untied embeddings; one with head_dim x heads != hidden_size (as Qwen3-8B's 32 x 128 over 4096 is not).
CASES = [
    (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          head_dim=16, intermediate_size=128, tie_word_embeddings=True), 24, 40, 2),
    (dict(vocab_size=151_936, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
          head_dim=8, intermediate_size=96, tie_word_embeddings=False), 16, 48, 2),
    (dict(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
          head_dim=32, intermediate_size=80, tie_word_embeddings=True), 48, 80, 2),
]


def _model(kwargs: dict, tmp_path) -> tuple[Qwen3ForCausalLM, Shape]:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**kwargs, attn_implementation="sdpa"))
    model.config.to_json_file(tmp_path / "config.json")  # the planner's own shape reader
    return model, Shape(**shape_from_config_json(tmp_path / "config.json"))


def _counted(model, prompts, responses, backward: bool) -> int:
    first = lambda logp_CV: (logp_CV[:, 0],)  # noqa: E731  (any reduction: the head's FLOPs are the same)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        with torch.set_grad_enabled(backward):
            (out,), _ = forward.supervised_map(model, prompts, responses, None, first, (), chunk=16)
            if backward:
                out.sum().backward()
    return fc.get_total_flops()


# The first shape runs with the fast tests (~8 s of CPU); the other two (~25 s together) with `-m slow`.
@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=[pytest.mark.slow] * (i != "v1000"))
                                  for c, i in zip(CASES, ["v1000", "v151936-untied", "q!=H"])])
def test_forward_and_backward_flops_match_flop_counter(case, tmp_path):
    kwargs, P, R, B = case
    model, S = _model(kwargs, tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, S.vocab_size, (B, P), generator=g).tolist()
    responses = torch.randint(3, S.vocab_size, (B, R), generator=g).tolist()
    L = P + R
    model.eval()
    assert _counted(model, prompts, responses, False) == pytest.approx(cm.forward_flops(S, B, L, R), rel=0.05)
    model.train()
    assert _counted(model, prompts, responses, True) == pytest.approx(cm.update_flops(S, B, L, R), rel=0.05)
    forward.enable_checkpointing(model)
    with_ckpt = _counted(model, prompts, responses, True)
    assert with_ckpt == pytest.approx(cm.update_flops(S, B, L, R, checkpointing=True), rel=0.05)
    # what checkpointing adds is the layers' forward less each MLP down projection (torch stops early), exactly
    assert with_ckpt - _counted_without_ckpt(kwargs, tmp_path, prompts, responses) == cm.recompute_flops(S, B, L)


def _counted_without_ckpt(kwargs, tmp_path, prompts, responses) -> int:
    model, _ = _model(kwargs, tmp_path)
    return _counted(model.train(), prompts, responses, True)
