"""Query-similarity filter against model inversion (Raha et al., Algorithms 1 and 2).

The server keeps, for every client session, a FIFO buffer of the client's last
``N_B`` query images and a suspicious-query counter.  A new query is compared
with every buffered image; a buffered image *matches* when

    SSIM(buffered, query) > T_ssim   and   |hash(buffered) - hash(query)| < T_hash

and each match adds one to the counter.  Once the counter reaches ``L_sp`` the
session is UNSAFE and stays blocked.  This package holds the pieces, in plain
numpy (no Ray, no torch needed):

* ``ssim``: :func:`ssim_batch` -- SSIM of one grayscale query against a stack of
  images in one vectorised pass, numerically equal (to ~1e-7) to
  ``skimage.metrics.structural_similarity(a, b, data_range=R)`` with its
  defaults.  :class:`SSIMStack` caches the per-image half of the work so a
  buffer that is compared against many queries is prepared only once.
* ``hashing``: :func:`mean_hash` / :func:`downsample` -- the paper's "simple hash".
* ``params``: :class:`FilterParams` -- the filter configuration (Table 1 via
  :meth:`FilterParams.paper`, the config's ``filter`` section via
  :meth:`FilterParams.from_config`), :class:`FilterResult`, :class:`FilterInputError`.
* ``state``: :class:`ClientFilterState` -- one client session: Algorithm 2, input
  validation, compact ``to_bytes``/``from_bytes``.
* ``cross_client``: :class:`GlobalIndex` -- an optional cross-client check (not in
  the paper) for an attacker who spreads near-identical queries over several client
  ids; :class:`MultiClientFilter` -- per-client states plus that check.

Table 1's numbers live in :mod:`raymia.paper` (``PAPER_TABLE1``, re-exported here).
"""
from ...paper import PAPER_TABLE1
from .cross_client import GlobalIndex, GlobalResult, MultiClientFilter
from .hashing import downsample, mean_hash
from .params import FilterInputError, FilterParams, FilterResult
from .ssim import SSIM_WIN, SSIMStack, ssim_batch
from .state import ClientFilterState

__all__ = [
    "FilterInputError",
    "FilterParams",
    "FilterResult",
    "ClientFilterState",
    "GlobalIndex",
    "GlobalResult",
    "MultiClientFilter",
    "SSIMStack",
    "ssim_batch",
    "mean_hash",
    "downsample",
    "PAPER_TABLE1",
    "SSIM_WIN",
]
