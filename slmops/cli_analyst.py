"""``slmops drift baseline`` (and the analyst's other commands): parsing and output only;
the work is in ``cloud.analyst``."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import click
import msgspec

from slmops.cli_common import fleet_id, nats_option, run

__all__ = ["baseline"]


def _time(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO time like 2026-01-01T10:02:00Z") from exc
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@click.command("baseline")
@nats_option
@click.option("--fleet", required=True, callback=fleet_id, help="The fleet.")
@click.option("--model", required=True, help="The model name.")
@click.option("--version", type=int, default=None, help="Model version. Default: the newest the cloud saw.")
@click.option("--variant", default=None, help="Only this variant. Default: every variant of the version.")
@click.option(
    "--from", "start", callback=_time, help="Period start (ISO, UTC if no zone). Default: --to - 1h."
)
@click.option("--to", "end", callback=_time, help="Period end (ISO, UTC if no zone). Default: now.")
@click.option("--json", "as_json", is_flag=True, help="Print the events published as JSON lines.")
def baseline(
    nats_url: str,
    fleet: str,
    model: str,
    version: int | None,
    variant: str | None,
    start: datetime | None,
    end: datetime | None,
    as_json: bool,
) -> None:
    """Accept the fleet's traffic of a period as the model's production baseline.

    The active cloud pools that period's stored rounds into the references drift is watched
    against, resolves the fleet events the new normal covers, and publishes a baseline event
    (kind "baseline", reference "baseline:analyst-<n>") on slmops.drift.<fleet>."""

    async def main() -> None:
        # Here, not at the top: `--help` imports no networking.
        from slmops.cloud.analyst.baseline import BASELINE_SUBJECT, BaselineReply, BaselineRequest
        from slmops.shared.connect import connect_once, redact_url
        from slmops.shared.errors import NatsUnavailable
        from slmops.shared.jetstream import nats_errors
        from slmops.shared.messages import encode_json

        req = BaselineRequest(
            fleet=fleet, model=model, version=version, variant=variant, start=start, end=end
        )
        nc = await connect_once(nats_url)
        try:
            try:
                with nats_errors("request", BASELINE_SUBJECT, redact_url(nats_url)):
                    msg = await nc.request(BASELINE_SUBJECT, msgspec.json.encode(req), timeout=15)
            except NatsUnavailable as exc:  # no responders, timeout
                raise ValueError(f"no active cloud answered on {BASELINE_SUBJECT} ({exc.reason})") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()
        reply = msgspec.json.decode(msg.data, type=BaselineReply)
        if reply.error:
            raise ValueError(reply.error)
        for e in reply.events:
            click.echo(encode_json(e).decode() if as_json else f"{e.kind:<8} {e.id}  {e.summary}")

    run(main)
