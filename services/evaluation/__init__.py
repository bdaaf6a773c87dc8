"""The one home for every metric in wlcad (protocols: shared/README.md, "Protocols").

* :mod:`~services.evaluation.overlap` — Dice (label estimation).
* :mod:`~services.evaluation.matching` — typed lesions/candidates and the hit rules (LUNA16, ADAM).
* :mod:`~services.evaluation.froc` — FROC curve, sensitivities at 1/8…8 FP/case, CPM (LUNA16's way).
* :mod:`~services.evaluation.roc` — case-level ROC curve and AUC (anomaly detection).
* :mod:`~services.evaluation.bootstrap` — 95 % CIs from 1,000 seeded resamples of cases.
* :mod:`~services.evaluation.plots` — FROC/ROC PNGs (imported on its own: it needs matplotlib, the
  metrics do not).
"""

from services.evaluation.bootstrap import (
    ConfidenceInterval,
    FrocBootstrap,
    bootstrap_auc,
    bootstrap_froc,
    bootstrap_mean_dice,
    percentile_interval,
    resample_cases,
)
from services.evaluation.froc import LUNA16_FP_RATES, FrocResult, OperatingPoint, froc
from services.evaluation.matching import Candidate, Lesion, MatchResult, MatchRule, match_candidates
from services.evaluation.overlap import dice
from services.evaluation.roc import RocResult, roc_auc, roc_curve

__all__ = [
    "LUNA16_FP_RATES",
    "Candidate",
    "ConfidenceInterval",
    "FrocBootstrap",
    "FrocResult",
    "Lesion",
    "MatchResult",
    "MatchRule",
    "OperatingPoint",
    "RocResult",
    "bootstrap_auc",
    "bootstrap_froc",
    "bootstrap_mean_dice",
    "dice",
    "froc",
    "match_candidates",
    "percentile_interval",
    "resample_cases",
    "roc_auc",
    "roc_curve",
]
