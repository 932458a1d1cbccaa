"""Drift detection on telemetry aggregates (docs/architecture.md §7): tests, calibration, label shift."""

from slmops.cloud.drift.calibrate import Calibration, Calibrator, calibrate
from slmops.cloud.drift.detector import DriftDetector
from slmops.cloud.drift.labelshift import bbse_priors, confusion_matrix, em_priors, expected_accuracy
from slmops.cloud.drift.stats import benjamini_hochberg, window_test
from slmops.cloud.drift.units import Group, NodeUnit, UnitSig, group_key

__all__ = [
    "Calibration",
    "Calibrator",
    "DriftDetector",
    "Group",
    "NodeUnit",
    "UnitSig",
    "bbse_priors",
    "benjamini_hochberg",
    "calibrate",
    "confusion_matrix",
    "em_priors",
    "expected_accuracy",
    "group_key",
    "window_test",
]
