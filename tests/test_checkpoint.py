import pickle

import pytest
import torch

from wsilocal.errors import CheckpointError
from wsilocal.train.checkpoint import load_checkpoint, save_checkpoint


class Evil:
    """Unpickling this would run code (os.system) if the loader trusted pickles."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def state():
    return {"model": {"w": torch.arange(6.0).view(2, 3)}, "signature": {"k": 4, "classes": ["a", "b"]}}


def test_roundtrip_and_no_temporary_left(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state(), path)
    loaded = load_checkpoint(path, expected_signature={"k": 4, "classes": ["a", "b"]})
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0).view(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state(), path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure
        save_checkpoint({"model": {}, "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_signature_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state(), path)
    with pytest.raises(CheckpointError, match="checkpoint is from another model \\(k: checkpoint 4 vs model 8\\)"):
        load_checkpoint(path, expected_signature={"k": 8, "classes": ["a", "b"]})


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "format_version": 1, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: refused to load, it contains objects beyond tensors .*system"):
        load_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_checkpoint(tmp_path, fraction):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_checkpoint(path)


def test_zero_byte_and_missing_and_foreign(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty checkpoint file"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a wsilocal checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "plain.pkl")
