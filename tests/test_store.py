import pytest
import torch

from opd.infra import store


def _batch():
    tensors = {"offsets_B1": torch.tensor([0, 2, 5]), "x_N": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
               "k_NK": torch.arange(10).reshape(5, 2).float()}
    return tensors, ["a#0", "b#0"]


def test_round_trip(tmp_path):
    tensors, ids = _batch()
    store.save(tmp_path / "f.safetensors", "kind", 1, tensors, ids, {"K": 2})
    got, got_ids, meta = store.load(tmp_path / "f.safetensors", "kind", 1, ("x_N",))
    assert got_ids == ids and meta == {"K": 2} and torch.equal(got["k_NK"], tensors["k_NK"])


def test_other_version_kind_and_truncation_are_named(tmp_path):
    tensors, ids = _batch()
    path = tmp_path / "f.safetensors"
    store.save(path, "kind", 2, tensors, ids, {})
    with pytest.raises(store.StoreError, match=r"f.safetensors: kind format version '2'; this code reads version 1"):
        store.load(path, "kind", 1, ())
    with pytest.raises(store.StoreError, match="expected a 'other' file"):
        store.load(path, "other", 2, ())
    with pytest.raises(store.StoreError, match="missing tensor"):
        store.load(path, "kind", 2, ("y_N",))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(store.StoreError, match="f.safetensors: unreadable or truncated"):
        store.load(path, "kind", 2, ())
    with pytest.raises(store.StoreError, match="file not found"):
        store.load(tmp_path / "none.safetensors", "kind", 2, ())


def test_inconsistent_lengths_are_named(tmp_path):
    tensors, ids = _batch()
    tensors["x_N"] = tensors["x_N"][:4]
    store.save(tmp_path / "f.safetensors", "kind", 1, tensors, ids, {})
    with pytest.raises(store.StoreError, match="x_N has 4 rows, offsets say 5 tokens"):
        store.load(tmp_path / "f.safetensors", "kind", 1, ())


def test_nan_is_reported_with_rollout_id_and_position():
    tensors, ids = _batch()
    tensors["x_N"][3] = float("nan")  # token 3 = second token of rollout "b#0"
    with pytest.raises(store.StoreError, match=r"non-finite x_N in rollout 'b#0' at response position 1"):
        store.check_finite("f", tensors, ids, ("x_N",))
    tensors["x_N"][3] = 0.0
    tensors["k_NK"][0, 1] = float("inf")
    with pytest.raises(store.StoreError, match=r"rollout 'a#0' at response position 0"):
        store.check_finite("f", tensors, ids, ("k_NK",))


def test_to_padded_by_hand():
    padded, valid = store.to_padded(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 5]), pad=-1)
    assert padded.tolist() == [[1, 2, -1], [3, 4, 5]]
    assert valid.tolist() == [[True, True, False], [True, True, True]]
