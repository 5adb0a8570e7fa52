"""Khosravy et al.'s generator-based white-box model inversion (the attack the
dummy-model paper assumes, §3): optimise a latent xi of the attacker's generator F
(trained on auxiliary faces, never on D) to minimise CE(R'(F(xi)), k_hat).

One call attacks a whole batch of rows; each row has its own target, restart seed and
alpha.  The loss is the *sum* of per-row losses and Adam is element-wise, so every row
follows exactly the trajectory it would follow alone (up to float noise): batching is
only a speed-up.  The latent is clamped to [-bound, bound] (the prior's range).

Fast path (opt-in, :class:`FastPath`, driven by ``attack.precision / channels_last /
fold_bn / compile``): the optimisation runs on prepared copies of the frozen networks —
BatchNorm folded into the convolutions, NHWC memory format, bf16 autocast, optionally
``torch.compile`` — while the final images, confidences and ranks are always computed
with the original fp32 networks, so the fast path only changes the trajectory (float
noise that Adam amplifies), never how a result is scored.  :func:`check_fast_path`
measures how often its success decisions agree with an fp32 run.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..models import fold_batchnorm


@dataclass
class MIAResult:
    latents: torch.Tensor      # (R, d) final latents
    images: torch.Tensor       # (R, C, H, W) reconstructions F(xi), in [0, 1]
    loss: torch.Tensor         # (R,) final CE(R'(F(xi)), target)
    target_conf: torch.Tensor  # (R,) R'(F(xi))[target]
    seconds: float
    target_rank: Optional[torch.Tensor] = None   # (R,) rank of the target in R'(F(xi)) (1 = top-1)
    aug_conf: Optional[torch.Tensor] = None      # (R,) target confidence under augmentation (whitebox_mia)


@dataclass(frozen=True)
class FastPath:
    """How the attack's inner loop runs (see the module docstring).  The defaults are the
    fp32 reference path."""
    precision: str = "fp32"      # fp32 | bf16
    channels_last: bool = False
    fold_bn: bool = False
    compile: str = "off"         # off | default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead
    pad_channels: bool = False   # pad the image's channels to 8 (zero weights) for tensor-core conv kernels

    @classmethod
    def of(cls, spec) -> "FastPath":
        """From a FastPath, an :class:`~raymia.config.AttackCfg` (or anything with these
        attributes), a dict, or None (the reference path)."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        get = spec.get if isinstance(spec, dict) else (lambda k, d: getattr(spec, k, d))
        fp = cls(**{f.name: get(f.name, f.default) for f in fields(cls)})
        if fp.precision not in ("fp32", "bf16"):
            raise ValueError(f"fast path precision must be fp32 or bf16, got {fp.precision!r}")
        if fp.compile not in ("off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"):
            raise ValueError(f"unknown compile mode {fp.compile!r}")
        return fp

    @property
    def is_reference(self) -> bool:
        return self == FastPath()

    @property
    def cudagraphs(self) -> bool:
        return self.compile in ("max-autotune", "reduce-overhead")


def initial_latents(seeds: Sequence[int], dim: int) -> torch.Tensor:
    """One N(0, I) latent per row, drawn from the row's own seed (so a row starts at the
    same point whatever batch it is in)."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ----------------------------------------------------------------------------- prepared networks

def _fingerprint(*nets: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``nets`` is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version) for n in nets for t in list(n.parameters()) + list(n.buffers()))


class _Prepared:
    """Copies of (model, generator) in the fast path's form plus the per-row loss function
    (compiled when asked).  Cached per original model so that ``torch.compile`` warms up
    once per worker, not once per chunk."""

    def __init__(self, model: nn.Module, generator: nn.Module, fast: FastPath, device: torch.device):
        import copy
        m, g = copy.deepcopy(model), copy.deepcopy(generator)
        if fast.fold_bn:
            m, g = fold_batchnorm(m), fold_batchnorm(g)
        if fast.pad_channels:
            m, g = pad_image_channels(m, g, device)
        if fast.channels_last:
            m, g = m.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        self.model, self.generator = m, g
        dtype = torch.bfloat16 if fast.precision == "bf16" else None
        cl = fast.channels_last

        def row_loss(z: torch.Tensor, a: Optional[torch.Tensor], t: torch.Tensor):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                x = g(z)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                p = m(x, a) if a is not None else m(x)
            conf = p.float().gather(1, t[:, None])[:, 0]
            return -torch.log(conf.clamp_min(1e-12)), conf

        self.row_loss = row_loss
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True     # fixed shapes per chunk: let cuDNN pick its kernels
        if fast.compile != "off":
            from torch import _dynamo
            # one compiled graph per (networks, batch size); the default limit of 8 would fall back to eager
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            kw = {} if fast.compile == "default" else {"mode": fast.compile}
            self.row_loss = torch.compile(row_loss, dynamic=False, **kw)


def pad_image_channels(model: nn.Module, generator: nn.Module, device, multiple: int = 8) -> tuple[nn.Module, nn.Module]:
    """Make the image between ``generator`` and ``model`` carry a multiple of ``multiple``
    channels: the generator's last conv gets extra output channels with zero weights and
    the model's image-reading convs (those with that many input channels) extra zero input
    weights, so the extra channels change nothing.  Convolutions with 1 or 3 channels fall
    off cuDNN's tensor-core NHWC kernels (the image's input-gradient through the stem was
    the slowest kernel of the compiled step on an H100).  Modifies the given modules in
    place (pass copies); the result is checked against the unpadded pair on two latents
    and the unpadded pair is returned when it differs or fails."""
    import copy
    convs = [mod for mod in generator.modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]
    if not convs or convs[-1].groups != 1:
        return model, generator
    last = convs[-1]
    c = last.out_channels
    pad = -c % multiple
    readers = [mod for mod in model.modules() if isinstance(mod, nn.Conv2d) and mod.in_channels == c and mod.groups == 1]
    if pad == 0 or not readers:
        return model, generator
    m2, g2 = copy.deepcopy(model), copy.deepcopy(generator)
    last2 = [mod for mod in g2.modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))][-1]
    odim = 1 if isinstance(last2, nn.ConvTranspose2d) else 0      # ConvTranspose2d weight: (in, out, k, k)
    with torch.no_grad():
        w = last2.weight
        shape = list(w.shape); shape[odim] = pad
        last2.weight = nn.Parameter(torch.cat([w, w.new_zeros(shape)], odim), requires_grad=False)
        if last2.bias is not None:
            last2.bias = nn.Parameter(torch.cat([last2.bias, last2.bias.new_zeros(pad)]), requires_grad=False)
        last2.out_channels = c + pad
        for mod in m2.modules():
            if isinstance(mod, nn.Conv2d) and mod.in_channels == c and mod.groups == 1:
                w = mod.weight
                mod.weight = nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], pad, *w.shape[2:])], 1),
                                          requires_grad=False)
                mod.in_channels = c + pad
        try:
            z = torch.randn(2, generator.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
            ref, out = model(generator(z)).float(), m2(g2(z)).float()
            ok = ref.shape == out.shape and torch.allclose(ref, out, rtol=1e-3, atol=1e-5)
        except RuntimeError:
            ok = False
    return (m2, g2) if ok else (model, generator)


_PREPARED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def prepare(model: nn.Module, generator: nn.Module, fast: FastPath, device) -> _Prepared:
    """The fast path's networks for (model, generator), reused while neither changes."""
    device = torch.device(device)
    per_model = _PREPARED.setdefault(model, {})
    key = (id(generator), fast, str(device))
    fp = _fingerprint(model, generator)
    hit = per_model.get(key)
    if hit is None or hit[0] != fp or hit[1]() is not generator:
        per_model[key] = (fp, weakref.ref(generator), _Prepared(model, generator, fast, device))
    return per_model[key][2]


# ----------------------------------------------------------------------------- the attack

@torch.no_grad()
def score_latents(model: nn.Module, generator: nn.Module, latents: torch.Tensor, targets: torch.Tensor,
                  alphas: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, target confidence, target rank) of latents under the fp32 networks."""
    images = generator(latents).float()
    p = (model(images, alphas) if alphas is not None else model(images)).float()
    conf = p.gather(1, targets[:, None])[:, 0]
    rank = (p > conf[:, None]).sum(1) + 1
    return images, conf, rank


def generator_mia(model: nn.Module, generator: nn.Module, targets: Sequence[int], seeds: Sequence[int],
                  alphas: Optional[Sequence[float]] = None, iters: int = 300, lr: float = 0.05,
                  bound: float = 3.0, device="cpu", autocast_dtype: Optional[torch.dtype] = None,
                  progress: Optional[Callable[[int, int, dict], None]] = None, fast=None) -> MIAResult:
    """Run the attack for every row.  ``model(x, alpha)`` must return confidence vectors
    (probabilities) — a :class:`~raymia.defenses.dummy.CombinedModel`, or any model
    wrapped by :class:`raymia.models.ProbModel`.  Both networks must be frozen and in eval mode.

    ``fast`` (a :class:`FastPath`, an ``AttackCfg`` or None) selects the fast path;
    ``autocast_dtype`` alone autocasts the reference networks (older interface)."""
    device = torch.device(device)
    for net in (model, generator):
        if net.training:
            raise ValueError("attack needs frozen models in eval mode (train-mode BatchNorm couples rows)")
    fast = FastPath.of(fast)
    if fast.precision != "fp32" or fast.compile != "off" or fast.fold_bn or fast.channels_last:
        prep = prepare(model, generator, fast, device)
        row_loss = prep.row_loss
    else:
        def row_loss(z, a, t):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                p = model(generator(z), a) if a is not None else model(generator(z))
            conf = p.float().gather(1, t[:, None])[:, 0]
            return -torch.log(conf.clamp_min(1e-12)), conf
    t = torch.as_tensor(list(targets), dtype=torch.long, device=device)
    a = None if alphas is None else torch.as_tensor(list(alphas), dtype=torch.float32, device=device)
    if len(seeds) != t.numel() or (a is not None and a.numel() != t.numel()):
        raise ValueError("targets, seeds and alphas must have one entry per row")
    xi = initial_latents(seeds, generator.latent_dim).clamp_(-bound, bound).to(device).requires_grad_(True)
    opt = torch.optim.Adam([xi], lr=lr, fused=device.type == "cuda" and not fast.is_reference)
    t0 = time.time()
    for it in range(1, iters + 1):
        if fast.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, conf = row_loss(xi, a, t)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            xi.clamp_(-bound, bound)
        if progress:
            progress(it, iters, {"mean_conf": float(conf.mean())})
    images, conf, rank = score_latents(model, generator, xi.detach(), t, a)
    return MIAResult(xi.detach().cpu(), images.cpu(), (-torch.log(conf.clamp_min(1e-12))).cpu(), conf.cpu(),
                     time.time() - t0, rank.cpu())


# ----------------------------------------------------------------------------- fast path vs fp32

def _ranks(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r


def compare_results(ref: MIAResult, other: MIAResult, k: int = 5,
                    decide: Optional[Callable[[torch.Tensor], np.ndarray]] = None) -> dict:
    """How far ``other`` (e.g. a fast-path run) agrees with ``ref`` (the fp32 run) row by
    row: agreement of the top-1 / top-k success decisions under the attacked model, the
    Spearman correlation of the target confidences (does it rank rows alike?), the mean
    |log conf| difference, and, with ``decide(images) -> bool array`` (e.g. R_E's top-5
    via :class:`~raymia.evaluation.ReconstructionScorer`), the agreement of those decisions."""
    n = int(ref.target_conf.numel())
    if n != int(other.target_conf.numel()):
        raise ValueError("the two results have different numbers of rows")
    c1, c2 = ref.target_conf.double().numpy(), other.target_conf.double().numpy()
    r1, r2 = ref.target_rank.numpy(), other.target_rank.numpy()
    out = {"rows": n,
           "top1_rate_ref": float((r1 <= 1).mean()), "top1_rate_fast": float((r2 <= 1).mean()),
           "top1_agreement": float(((r1 <= 1) == (r2 <= 1)).mean()),
           f"top{k}_rate_ref": float((r1 <= k).mean()), f"top{k}_rate_fast": float((r2 <= k).mean()),
           f"top{k}_agreement": float(((r1 <= k) == (r2 <= k)).mean()),
           "conf_spearman": float(np.corrcoef(_ranks(c1), _ranks(c2))[0, 1]) if n > 1 else float("nan"),
           "mean_abs_log_conf_diff": float(np.abs(np.log(np.maximum(c1, 1e-12)) - np.log(np.maximum(c2, 1e-12))).mean()),
           # same side of the fp32 run's median confidence: would the same half of the rows be called leaky?
           "median_split_agreement": float(((c1 > np.median(c1)) == (c2 > np.median(c1))).mean())}
    if decide is not None:
        d1, d2 = np.asarray(decide(ref.images), bool), np.asarray(decide(other.images), bool)
        out.update({"decision_rate_ref": float(d1.mean()), "decision_rate_fast": float(d2.mean()),
                    "decision_agreement": float((d1 == d2).mean())})
    return out


def check_fast_path(model: nn.Module, generator: nn.Module, targets: Sequence[int], seeds: Sequence[int],
                    alphas: Optional[Sequence[float]], fast, iters: int, lr: float, bound: float, device,
                    k: int = 5, decide: Optional[Callable[[torch.Tensor], np.ndarray]] = None) -> dict:
    """Run the same rows with the fp32 reference path and with ``fast``; return
    :func:`compare_results` plus both runs' seconds."""
    ref = generator_mia(model, generator, targets, seeds, alphas, iters, lr, bound, device)
    other = generator_mia(model, generator, targets, seeds, alphas, iters, lr, bound, device, fast=fast)
    out = compare_results(ref, other, k, decide)
    out.update({"seconds_ref": ref.seconds, "seconds_fast": other.seconds})
    return out
