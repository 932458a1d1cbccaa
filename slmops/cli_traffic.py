"""``slmops traffic``: parsing and output only; the work is in ``slmops.traffic``."""

from __future__ import annotations

import click

from slmops.cli_common import run

__all__ = ["traffic"]


@click.command("traffic")
@click.option(
    "--url", default="http://127.0.0.1:8470", show_default=True, help="The node's local API (its --http)."
)
@click.option("--count", type=click.IntRange(1), default=400, show_default=True, help="Texts to send.")
@click.option(
    "--rate", type=click.FloatRange(0.1, 10_000), default=20.0, show_default=True, help="Texts per second."
)
@click.option("--batch", type=click.IntRange(1, 64), default=4, show_default=True, help="Texts per request.")
@click.option(
    "--shift",
    multiple=True,
    help="A topic made 4x as likely (repeatable), e.g. --shift sports --shift money: a label shift "
    "for the cloud to notice.",
)
@click.option("--feedback", is_flag=True, help="Send each text's true label back (/v1/feedback).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the texts drawn.")
def traffic(
    url: str, count: int, rate: float, batch: int, shift: tuple[str, ...], feedback: bool, seed: int
) -> None:
    """Send held-out texts from the factory's corpus to a node, at a steady rate.

    The texts are real utterances the default model never trained on, drawn with the corpus's
    own topic mix (or a shifted one with --shift). A rollout judges a stage once the canary
    has served 200 predictions (--min-samples of `rollout start`): --count 400 covers it.
    Exits 1 when no text was answered.
    """
    from slmops.traffic import send_traffic

    async def go() -> int:
        report = await send_traffic(
            url, count=count, rate=rate, batch=batch, seed=seed, shift=shift, feedback=feedback
        )
        click.echo(report.line())
        return report.answered

    if not run(go):
        raise SystemExit(1)
