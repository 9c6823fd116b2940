import pytest
import torch

from opd.studies.diagnose import markdown, position_profile
from opd.studies.fixed_context import gains


def test_position_profile_by_hand():
    # seq 0 has length 4: tokens 0..3 fall in bins floor(2t/4) = 0,0,1,1
    # seq 1 has length 2: tokens 0..1 fall in bins 0,1
    values = torch.tensor([[1.0, 3.0, 5.0, 7.0], [10.0, 20.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert position_profile(values, valid, n_bins=2) == pytest.approx([(1 + 3 + 10) / 3, (5 + 7 + 20) / 3])


def test_empty_bins_are_nan():
    prof = position_profile(torch.tensor([[2.0]]), torch.tensor([[True]]), n_bins=3)
    assert prof[0] == 2.0 and all(p != p for p in prof[1:])


def test_fixed_context_gains_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2.0
    new = torch.tensor([0.5, 2.0, 3.0, 1.5])  # mean 1.75
    mask = torch.tensor([True, False, False, True])
    g = gains(base, new, mask)
    assert g["gain_abs"] == pytest.approx(0.25)
    assert g["gain_rel"] == pytest.approx(0.125)  # (2.0 - 1.75) / 2.0, the official code's relative gain
    assert g["gain_abs_selected"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2


def test_markdown_table():
    md = markdown([{"student": "s", "gain": 0.12345}], ".2f")
    assert md.splitlines() == ["| student | gain |", "|---|---|", "| s | 0.12 |"]
