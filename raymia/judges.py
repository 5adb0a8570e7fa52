"""Judges of a reconstruction, independent of the victim (evaluation stage).

A success rate is a claim about privacy, so a reconstruction is judged by more than the
paper's evaluator R_E (which shares the victim's architecture family and most of its
images, and can be fooled by adversarial features):

* ``external``: a pretrained face recognizer that ships in pip packages — dlib's ResNet
  face descriptor (``dlib-bin`` + ``face-recognition-models``; 128-D, trained on millions
  of faces of other people).  Images are upsampled to its 150x150 input (gray stacked to
  three channels).  Faces only.
* ``classical``: eigenfaces (whitened PCA of the gallery) + an RBF SVM: no CNN at all.
  Works for faces and digits (the digit settings' non-CNN judge).

Every judge identifies a reconstruction among the evaluator's identities from a gallery
of their real images (R_E's training split): the target's rank, top-1/top-5, and the
distance to the target's nearest real image in the judge's feature space (MIBench's
"KNN distance").  ``accuracy`` on held-out real images says how far each judge can be
trusted; the attacker never sees a judge.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split

DIGIT_SETS = ("mnist5k", "digits", "mnist")


class JudgeError(RuntimeError):
    """A judge that cannot run here (e.g. its package is missing); the message says why."""


def _ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target among the identities (higher score = more likely)."""
    true = scores[np.arange(len(targets)), targets]
    return (scores > true[:, None]).sum(1) + 1


class Judge:
    """Identification among the gallery's identities; subclasses give features and scores."""

    name = "judge"

    def __init__(self, k: int = 5):
        self.k = k
        self.gallery_feats: Optional[np.ndarray] = None
        self.gallery_y: Optional[np.ndarray] = None
        self.n_ids = 0

    # -- what a judge must provide
    def features(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _fit_scores(self) -> None:
        """Called after the gallery features are known (e.g. to train a classifier)."""

    def scores(self, feats: np.ndarray) -> np.ndarray:
        """(N, n_ids): default = minus the distance to the nearest gallery image of each identity."""
        d = self._dists(feats)
        out = np.full((feats.shape[0], self.n_ids), -np.inf)
        for i in range(self.n_ids):
            own = self.gallery_y == i
            if own.any():
                out[:, i] = -d[:, own].min(1)
        return out

    # -- shared
    def _dists(self, feats: np.ndarray) -> np.ndarray:
        a = feats[:, None, :] - self.gallery_feats[None, :, :]
        return np.sqrt((a * a).sum(-1))

    def fit(self, gallery: Split, n_ids: Optional[int] = None, cache: Optional[Path] = None) -> "Judge":
        """Embed the gallery (read from / written to ``cache``, an .npy file, when given:
        the external judge spends ~80 ms per image on one core)."""
        self.gallery_y = gallery.y.numpy().astype(np.int64)
        self.n_ids = int(n_ids if n_ids is not None else self.gallery_y.max() + 1)
        feats = None
        if cache is not None and cache.exists():
            feats = np.load(cache)
            if feats.shape[0] != len(gallery):
                feats = None
        if feats is None:
            feats = self.features(gallery.x)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as fh:
                    np.save(fh, feats)
                os.replace(tmp, cache)
        self.gallery_feats = feats
        self._fit_scores()
        return self

    def judge(self, images: torch.Tensor, targets: Sequence[int]) -> dict:
        """Verdicts for reconstructions of ``targets`` (gallery identities): columns
        ``<name>_rank``, ``<name>_top1``, ``<name>_top5``, ``<name>_dist``."""
        t = np.asarray(list(targets), dtype=np.int64)
        feats = self.features(images)
        rank = _ranks(self.scores(feats), t)
        d = self._dists(feats)
        same = self.gallery_y[None, :] == t[:, None]
        dist = np.where(same, d, np.inf).min(1)
        n = self.name
        return {f"{n}_rank": rank, f"{n}_top1": rank <= 1, f"{n}_top5": rank <= self.k, f"{n}_dist": dist}

    def accuracy(self, test: Split) -> dict:
        """Top-1 / top-5 identification of held-out real images (how far to trust it)."""
        v = self.judge(test.x, test.y.tolist())
        return {"top1": float(v[f"{self.name}_top1"].mean()), "top5": float(v[f"{self.name}_top5"].mean()),
                "n": len(test)}


class ExternalFaceJudge(Judge):
    """dlib's pretrained ResNet face descriptor, nearest gallery image per identity.

    Its own "same person below 0.6" rule is not calibrated for 32x32 faces upsampled to
    150x150, so only ranks and distances are used."""

    name = "external"
    MODEL = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(self, size: int = 150, k: int = 5, batch: int = 64):
        super().__init__(k)
        self.size, self.batch = size, batch
        try:
            import dlib
        except ImportError:
            raise JudgeError("the external face judge needs the dlib-bin package (pip install dlib-bin "
                             "face-recognition-models; both are raymia dependencies)") from None
        spec = importlib.util.find_spec("face_recognition_models")   # not imported: its __init__ needs pkg_resources
        if spec is None or not spec.submodule_search_locations:
            raise JudgeError("the external face judge needs the face-recognition-models package "
                             "(pip install face-recognition-models)")
        path = Path(list(spec.submodule_search_locations)[0]) / "models" / self.MODEL
        if not path.exists():
            raise JudgeError(f"dlib's face descriptor model is missing: {path}")
        self.net = dlib.face_recognition_model_v1(str(path))

    def chips(self, images: torch.Tensor) -> list:
        x = images.detach().float().cpu()
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return [np.ascontiguousarray(c) for c in u8]

    def features(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, images.shape[0], self.batch):
            out += [np.asarray(d) for d in self.net.compute_face_descriptor(self.chips(images[i:i + self.batch]))]
        return np.stack(out).astype(np.float64) if out else np.zeros((0, 128))


class ClassicalJudge(Judge):
    """Eigenfaces (whitened PCA of the gallery) + RBF SVM; KNN distance in PCA space."""

    name = "classical"

    def __init__(self, components: int = 60, c: float = 10.0, k: int = 5, seed: int = 0):
        super().__init__(k)
        self.components, self.c, self.seed = components, c, seed
        self.pca = self.svm = None

    def features(self, images: torch.Tensor) -> np.ndarray:
        x = images.detach().float().cpu().flatten(1).numpy().astype(np.float64)
        if self.pca is None:              # fitting: the gallery defines the basis
            from sklearn.decomposition import PCA
            n = min(self.components, x.shape[0] - 1, x.shape[1])
            self.pca = PCA(n_components=n, whiten=True, random_state=self.seed).fit(x)
        return self.pca.transform(x)

    def _fit_scores(self) -> None:
        from sklearn.svm import SVC
        self.svm = SVC(C=self.c, kernel="rbf", gamma="scale", decision_function_shape="ovr",
                       random_state=self.seed).fit(self.gallery_feats, self.gallery_y)

    def scores(self, feats: np.ndarray) -> np.ndarray:
        s = np.full((feats.shape[0], self.n_ids), -np.inf)
        s[:, self.svm.classes_] = self.svm.decision_function(feats)
        return s


JUDGES = {"external": ExternalFaceJudge, "classical": ClassicalJudge}


def build_judges(cfg, bundle) -> dict[str, Judge]:
    """The configured judges (``judge.names``) fitted on ``bundle``'s evaluator gallery.
    ``external`` (a face recognizer) is skipped on digit data sets."""
    jc = cfg.judge
    out: dict[str, Judge] = {}
    for name in jc.names:
        cache = None
        if name == "external":
            if bundle.name in DIGIT_SETS:
                continue
            j: Judge = ExternalFaceJudge(jc.external_size)
            key = json.dumps({"data": cfg.to_dict()["data"], "size": jc.external_size}, sort_keys=True)
            cache = (Path(cfg.run.out_root) / cfg.run.name / "artifacts" /
                     f"judge-external-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy")
        else:
            j = ClassicalJudge(jc.classical_components, jc.classical_c, seed=cfg.run.seed)
        out[name] = j.fit(bundle.eval_train, bundle.n_eval, cache)
    return out


def judge_accuracy(judges: dict, bundle) -> dict:
    """Each judge's top-1 / top-5 on the evaluator's held-out real images."""
    return {n: j.accuracy(bundle.eval_test) for n, j in judges.items()}
