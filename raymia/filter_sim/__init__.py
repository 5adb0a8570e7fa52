"""Simulations and metrics of the similarity-filter paper (Raha et al., sections 4.5-5),
plain torch/numpy; :mod:`raymia.distributed.filter_sweep` spreads the units over Ray
actors and :mod:`raymia.report.filter` draws the tables and figures.

``units``: the configurations of a sweep and the simulated sessions (:class:`Unit`,
their ids and seeds); ``simulate``: :class:`SimContext` and the session runners
(:func:`run_unit`); ``metrics``: Eqs. 2-5 (:func:`detection_metrics`) and the
calibration (:func:`calibrate`)."""
from .metrics import METRIC_KEYS, calibrate, detection_metrics, sweep_summary
from .simulate import RUNNERS, SimContext, run_unit
from .units import (NO_FILTER, Unit, calib_units, config_name, derive_seed, extra_units, is_ablation,
                    is_window_ablation, main_units, paper_k, paper_name, resolve_labels, setting_key, sweep_configs)

__all__ = ["METRIC_KEYS", "calibrate", "detection_metrics", "sweep_summary", "RUNNERS", "SimContext", "run_unit",
           "NO_FILTER", "Unit", "calib_units", "config_name", "derive_seed", "extra_units", "is_ablation",
           "is_window_ablation", "main_units", "paper_k", "paper_name", "resolve_labels", "setting_key", "sweep_configs"]
