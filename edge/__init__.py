"""The edge node runtime: local ONNX inference with an HTTP and a Python API, privacy-filtered
telemetry in SQLite, window aggregates forwarded to NATS JetStream whenever the link is up.

    from slmops.edge import EdgeConfig, EdgeNode

    async with EdgeNode(EdgeConfig(fleet="f1", node="n1", data_dir="/var/lib/slmops")) as node:
        answers = await node.predict(["some text"])

Imports neither ``cloud`` nor cloud-only packages.
"""

from slmops.edge.config import EdgeConfig
from slmops.edge.errors import (
    DataDirInUse,
    EdgeError,
    FeedbackConflict,
    InvalidInput,
    NodeClosed,
    NoModel,
    StoreError,
    UnknownPrediction,
)
from slmops.edge.inference import InferenceFailed
from slmops.edge.node import EdgeNode, PredictionOut

__all__ = [
    "DataDirInUse",
    "EdgeConfig",
    "EdgeError",
    "EdgeNode",
    "FeedbackConflict",
    "InferenceFailed",
    "InvalidInput",
    "NoModel",
    "NodeClosed",
    "PredictionOut",
    "StoreError",
    "UnknownPrediction",
]
