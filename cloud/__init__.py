"""The cloud side of slmops: telemetry ingest with exactly-once counting, fleet state, drift
detection and drift events, the model registry and factory, recalibration and staged rollouts.

    from slmops.cloud import CloudConfig, CloudService

    async with CloudService(CloudConfig(nats_url="nats://127.0.0.1:4222")) as svc:
        ...

Never imports ``edge``. Everything here needs the ``cloud`` extra (``pip install
'slmops[cloud]'``: scipy for the drift statistics, onnx for the factory and recalibration,
pyyaml and the corpus for training).
"""

from slmops.cloud.config import CloudConfig
from slmops.cloud.errors import CloudError, LeaseLost, StateError
from slmops.cloud.registry import Registry, RegistryError, open_registry
from slmops.cloud.service import CloudService

__all__ = [
    "CloudConfig",
    "CloudError",
    "CloudService",
    "LeaseLost",
    "Registry",
    "RegistryError",
    "StateError",
    "open_registry",
]
