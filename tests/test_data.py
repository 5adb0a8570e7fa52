import numpy as np
import pytest
import torch

from raymia.config import load_config
from raymia.data import DataError, load_bundle, load_digits, load_lfw_aux, load_mnist5k, load_orl


def test_orl_counts_and_shapes():
    x, y, names = load_orl()
    assert x.shape == (400, 112, 92) and x.dtype == np.uint8
    assert len(names) == 40 and np.bincount(y).tolist() == [10] * 40


def test_mnist5k_and_digits_and_lfw():
    x, y = load_mnist5k()
    assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10
    d, t = load_digits()
    assert d.shape == (1797, 8, 8) and set(t.tolist()) == set(range(10))
    lfw = load_lfw_aux()
    assert lfw.shape == (100, 25, 25)


def test_orl_default_split():
    cfg = load_config("orl")
    b = load_bundle(cfg.data)
    assert b.n_private == 20 and b.n_eval == 40
    assert len(b.private_train) == 140 and len(b.private_test) == 60
    assert len(b.eval_test) == 120 and len(b.eval_train) == 280
    assert len(b.aux) == 200 + 100                       # 20 other people x 10 + 100 LFW faces
    assert b.private_train.x.shape[1:] == (1, 32, 32)
    assert 0.0 <= float(b.private_train.x.min()) and float(b.private_train.x.max()) <= 1.0
    assert torch.bincount(b.private_train.y).tolist() == [7] * 20
    # private identities are the first R_E classes (the shared targets)
    assert b.meta["eval_identities"][:20] == b.meta["private_identities"]
    # the attacker's identities never overlap D
    assert not set(b.meta["aux_identities"]) & set(b.meta["private_identities"])


def _rows(x):
    return {tuple(r.tolist()) for r in x.flatten(1)}


def test_splits_disjoint_and_deterministic():
    cfg = load_config("orl")
    b = load_bundle(cfg.data)
    assert not _rows(b.private_train.x) & _rows(b.private_test.x)
    assert not _rows(b.eval_train.x) & _rows(b.eval_test.x)
    assert not _rows(b.aux.x) & (_rows(b.private_train.x) | _rows(b.private_test.x))
    b2 = load_bundle(cfg.data)
    assert torch.equal(b.private_train.x, b2.private_train.x)
    cfg.data.split_seed = 1
    b3 = load_bundle(cfg.data)
    assert b3.meta["private_identities"] != b.meta["private_identities"]


def test_mnist5k_split():
    b = load_bundle(load_config("mnist").data)
    assert len(b.private_train) == 4000 and len(b.private_test) == 1000
    assert not _rows(b.private_train.x) & _rows(b.private_test.x)


@pytest.mark.parametrize("name, expected", [
    ("imagefolder", "one folder per identity"),
    ("mnist", "MNIST"),
    ("celeba", "CelebA"),
])
def test_missing_user_data_is_a_clear_error(tmp_path, name, expected):
    cfg = load_config("orl", [f"data.name={name}", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match="does not exist") as e:
        load_bundle(cfg.data)
    assert expected in str(e.value)
    cfg.data.root = None
    with pytest.raises(DataError, match="needs a local path"):
        load_bundle(cfg.data)


def test_wrong_layout_is_a_clear_error(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(b"")
    cfg = load_config("orl", ["data.name=celeba", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="missing"):
        load_bundle(cfg.data)
    cfg.data.name = "imagefolder"
    with pytest.raises(DataError, match="identity folders"):
        load_bundle(cfg.data)


def test_imagefolder_reads_a_local_tree(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(4):
        d = tmp_path / f"id{i}"
        d.mkdir()
        for j in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / f"{j}.jpg")
    cfg = load_config("orl", ["data.name=imagefolder", f"data.root={tmp_path}", "data.private_ids=2",
                              "data.train_per_id=4", "data.test_per_id=2", "data.aux_lfw=false"])
    b = load_bundle(cfg.data)
    assert b.private_train.x.shape == (8, 3, 32, 32) and b.n_eval == 4 and len(b.aux) == 12
