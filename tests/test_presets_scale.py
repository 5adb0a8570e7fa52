"""Paper-scale presets: they load with the papers' settings, fail with one clear message
when their data is missing, and the paper's split (R_E sharing only the target
identities with R_T, the attacker's auxiliary set from a second root) works on real
images (ORL faces written out as an image folder)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raymia.config import alpha_grid, load_config
from raymia.data import DataError, load_bundle, load_orl

ROOT = Path(__file__).resolve().parents[1]


def test_vggface2_preset_is_the_papers_setup():
    cfg = load_config("vggface2")
    d = cfg.data
    assert (d.name, d.private_ids, d.train_per_id, d.eval_ids, d.eval_shared_ids) == ("imagefolder", 2141, 40, 2167, 27)
    assert d.max_ids == 2141 + 2140 and d.aux_name == "celeba" and not d.aux_lfw
    for c in (cfg.target, cfg.evaluator):
        assert (c.arch, c.blocks, c.width, c.stem, c.loss) == ("faceresnet", [2, 2, 2, 2], 64, "imagenet", "cosface")
    assert (cfg.dummy.sigma2, cfg.dummy.sigma_tilde2) == (1.0, 0.0625)
    assert cfg.attack.targets == list(range(27)) and cfg.attack.restarts == 3
    grid = alpha_grid(cfg.sweep)
    assert len(grid) == 101 and grid[0] == 1.0 and grid[-1] == 0.0 and abs(grid[1] - 0.99) < 1e-9
    assert (cfg.attacker_gan.latent_dim, cfg.attacker_gan.ngf, cfg.data.image_size) == (100, 64, 64)
    assert cfg.attack.precision == "bf16" and cfg.resources.gpus_per_trial == 1.0


def test_celeba_presets():
    attr = load_config("celeba")
    assert attr.data.name == "celeba" and attr.data.celeba_target == "attr"
    assert len(attr.data.celeba_attrs) == 2 and attr.attack.targets == [0, 1, 2, 3]     # 2 attributes -> 4 classes
    assert attr.data.train_per_id + attr.data.test_per_id == 800                           # the paper's 800 per label
    ident = load_config("celeba_identity")
    assert ident.data.celeba_target == "identity" and ident.data.private_ids == 1000 and not ident.data.aux_name


@pytest.mark.parametrize("preset,expected", [("vggface2", "ROOT/<identity>/<image>.jpg"),
                                             ("celeba", "img_align_celeba"),
                                             ("celeba_identity", "identity_CelebA.txt")])
def test_presets_without_data_fail_clearly(preset, expected, tmp_path):
    with pytest.raises(DataError, match="data.root") as e:
        load_bundle(load_config(preset).data)
    assert expected in str(e.value)
    with pytest.raises(DataError, match="expected") as e:                     # a root without the data set in it
        load_bundle(load_config(preset, [f"data.root={tmp_path}"]).data)
    assert expected in str(e.value)


def test_job_without_data_exits_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "alpha_sweep.py"), "--preset", "vggface2",
                          "--set", f"run.out_root={tmp_path}"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert "data.root" in out.stderr and "<identity>" in out.stderr


@pytest.fixture(scope="module")
def orl_folders(tmp_path_factory):
    """ORL faces as two image folders: 30 identities (the 'VGGFace2' root) and the other
    10 (a second root for the auxiliary set)."""
    from PIL import Image
    imgs, labels, names = load_orl()
    base = tmp_path_factory.mktemp("faces")
    for i, (img, y) in enumerate(zip(imgs, labels)):
        d = base / ("main" if y < 30 else "aux") / f"id{y:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")
    return base / "main", base / "aux"


def test_shared_identities_and_aux_root_on_real_faces(orl_folders):
    main, aux = orl_folders
    cfg = load_config("vggface2", [f"data.root={main}", f"data.aux_root={aux}", "data.aux_name=imagefolder",
                                   "data.image_size=32", "data.private_ids=10", "data.train_per_id=6",
                                   "data.test_per_id=2", "data.eval_ids=18", "data.eval_shared_ids=3",
                                   "data.eval_test_per_id=2", "data.max_ids=25", "data.max_per_id=0",
                                   "data.aux_max=25"])
    b = load_bundle(cfg.data)
    assert b.n_private == 10 and b.n_eval == 18   # 3 shared + all 15 others
    assert b.private_to_eval.tolist() == [0, 1, 2] + [-1] * 7
    ids_private, ids_eval = b.meta["private_identities"], b.meta["eval_identities"]
    assert ids_eval[:3] == ids_private[:3]                            # the 3 targets are R_E's classes 0..2
    assert not set(ids_eval[3:]) & set(ids_private)                   # the rest of R_E never trained R_T
    assert {int(n[2:]) for n in ids_private + ids_eval} <= set(range(25))   # only the first max_ids folders
    assert len(b.aux) == 25 and b.meta["aux_images"] == 25 and str(aux) in b.meta["aux_source"]
    assert b.aux.x.shape[1:] == (3, 32, 32) and b.private_train.x.shape[1:] == (3, 32, 32)
    # the auxiliary images are the second root's files, in order
    from raymia.data import _read_images
    assert torch.equal(b.aux.x[0], _read_images([sorted((aux / "id030").iterdir())[0]], 32, gray=False)[0])


def test_missing_aux_root_is_one_clear_error(orl_folders, tmp_path):
    main, _ = orl_folders
    base = [f"data.root={main}", "data.image_size=32", "data.private_ids=10", "data.train_per_id=6",
            "data.test_per_id=2", "data.eval_ids=20", "data.eval_shared_ids=3", "data.eval_test_per_id=2",
            "data.max_per_id=0"]
    with pytest.raises(DataError, match="data.aux_root=PATH"):
        load_bundle(load_config("vggface2", base).data)                # aux_name celeba, no aux_root
    with pytest.raises(DataError, match="data.aux_root") as e:
        load_bundle(load_config("vggface2", base + [f"data.aux_root={tmp_path}"]).data)
    assert "img_align_celeba" in str(e.value) and "data.root" not in str(e.value).replace("data.aux_root", "")
