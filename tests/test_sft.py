import pytest
import torch

from opd.worlds.miniature.sft import build_model, collate, lr_at


def test_collate_masks_prompt_and_padding():
    batch = collate([([5, 6, 7, 8], 2), ([9, 10, 11], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_lr_schedule_by_hand():
    # warm-up 10 steps to 1.0, cosine to 0.1 at the end
    assert lr_at(0, 110, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 110, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 110, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(60, 110, 1.0, 10) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_at(110, 110, 1.0, 10) == pytest.approx(0.1)


def test_model_is_qwen3_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(64, 32, 1, 2, 1, 64, eos_id=0, seed=0)
    assert model.config.model_type == "qwen3"
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(model(ids).logits, again(ids).logits)
