"""Drift events to a webhook (``CloudConfig.webhook_url``): each event's JSON is POSTed once,
in order, from a durable pull consumer on ``SLMOPS_DRIFT`` (``slmops_webhook``), so a restart
or a takeover resumes where the last acknowledged event left off.

Retried, bounded: a POST that fails (connection error, timeout, a non-2xx answer) is retried
with a doubling delay (1 s up to 60 s) at most ``WEBHOOK_ATTEMPTS`` times; then the event is
dropped with a warning (``webhook_gave_up``) and the next one goes — one dead endpoint never
holds up the service, and the consumer never holds more than one event at a time."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.cloud.ingest.consumers import consumer_name
from slmops.shared import names
from slmops.shared.backoff import Backoff

__all__ = ["WEBHOOK_ATTEMPTS", "WEBHOOK_CONSUMER", "post_with_retries", "run_webhook"]

log = structlog.get_logger(__name__)

WEBHOOK_CONSUMER = names.WEBHOOK_CONSUMER
WEBHOOK_ATTEMPTS = 8
_MAX_DELAY = 60.0


async def post_with_retries(
    http: ClientSession, url: str, body: bytes, *, attempts: int = WEBHOOK_ATTEMPTS, first_delay: float = 1.0
) -> bool:
    """POST ``body`` (JSON) until a 2xx answer; False after ``attempts`` failures. Waits
    ``first_delay`` seconds after the first failure, doubling up to 60 s (``shared.backoff``)."""
    backoff = Backoff(first_delay, max(_MAX_DELAY, first_delay))
    for attempt in range(1, attempts + 1):
        delay = backoff.delay(attempt)
        try:
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if 200 <= r.status < 300:
                    return True
                why = f"HTTP {r.status}"
        except (ClientError, TimeoutError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        log.warning("webhook_failed", url=url, attempt=attempt, error=why[:200], retry_in=delay)
        if attempt < attempts:
            await anyio.sleep(delay)
    return False


async def run_webhook(
    js: JetStreamContext,
    url: str,
    fleets: Sequence[str] = (),
    *,
    timeout: float = 10.0,
    task_status: TaskStatus[None],
) -> None:
    """Post every new drift event (of ``fleets``; empty: all) to ``url`` until cancelled (see
    the module docstring). The durable is per fleet set, as the cloud's own consumers are."""
    durable = consumer_name(WEBHOOK_CONSUMER, fleets)
    subject = names.drift_subject(fleets[0]) if len(fleets) == 1 else names.DRIFT_ALL
    wanted = {names.drift_subject(f) for f in fleets}
    config = js_api.ConsumerConfig(
        durable_name=durable,
        deliver_policy=js_api.DeliverPolicy.NEW,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=WEBHOOK_ATTEMPTS * (_MAX_DELAY + timeout),
        filter_subject=subject,
    )
    sub = await js.pull_subscribe(subject, durable=durable, stream=names.DRIFT_STREAM, config=config)
    task_status.started()
    async with ClientSession(timeout=ClientTimeout(total=timeout)) as http:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except TimeoutError:
                continue
            for msg in msgs:
                if wanted and msg.subject not in wanted:
                    await msg.ack()
                    continue
                if not await post_with_retries(http, url, msg.data):
                    log.warning("webhook_gave_up", url=url, subject=msg.subject, attempts=WEBHOOK_ATTEMPTS)
                await msg.ack()
