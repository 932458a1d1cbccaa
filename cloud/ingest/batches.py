"""The ingest batch-latency histogram: its name and buckets, for the pull loop that fills it
(``consumers.PullLoop.batch_seconds``) and the metrics that export it (``analyst.metrics``, an
empty one on a standby)."""

from __future__ import annotations

from prometheus_client import Histogram as PromHistogram

__all__ = ["BATCH_BUCKETS", "batch_histogram"]

#: Buckets (seconds) of the batch-latency histogram: a 4096-message batch (the default) takes
#: ~0.25 s at the measured ~60 µs per message; a slow SQLite commit or a calibration, seconds.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def batch_histogram() -> PromHistogram:
    """An empty ``slmops_cloud_ingest_batch_seconds`` histogram, registered nowhere."""
    return PromHistogram(
        "slmops_cloud_ingest_batch_seconds",
        "seconds to handle one ingest batch (decode, dedupe, state, drift detection, commit, ack)",
        buckets=BATCH_BUCKETS,
        registry=None,
    )
