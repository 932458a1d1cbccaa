"""The slmops wire contract: messages, resource names, histogram maths, bundle format and
signature, configuration, logging and NATS helpers. Imports neither ``edge`` nor ``cloud``."""

from slmops.shared.errors import BundleError, ConfigError, NatsUnavailable, ResourceConflict, SlmopsError
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    Assignment,
    DeviceProfile,
    DriftEvent,
    ModelManifest,
    ModelRef,
    NodeStatus,
    RolloutEvent,
    TelemetryAggregate,
)

__all__ = [
    "Assignment",
    "BundleError",
    "ConfigError",
    "DeviceProfile",
    "DriftEvent",
    "Histogram",
    "ModelManifest",
    "ModelRef",
    "NatsUnavailable",
    "NodeStatus",
    "ResourceConflict",
    "RolloutEvent",
    "SlmopsError",
    "TelemetryAggregate",
]
