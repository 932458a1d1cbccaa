"""``slmops keys init-root|rotate|revoke|list``: the fleet's root-signed key list (parsing
only; the list is ``shared.keylist``, publishing it ``cloud.keys``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from slmops.cli_common import (
    call,
    key_file_option,
    nats_option,
    out_dir_option,
    run,
    table_line,
    trust_option,
)
from slmops.cli_models import keys

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from slmops.shared.keylist import KeyList, KeyStatus

__all__ = ["keys"]

_root_option = key_file_option(
    "--root", "root_path", required=True, envvar="SLMOPS_ROOT_KEY",
    help="The root private key (root.key from `slmops keys init-root`) that signs the key list.",
)  # fmt: skip


def _key_ids(values: tuple[str, ...]) -> list[str]:
    """Each value a .pub file (its key id is taken) or a key id as `keys list` shows it."""
    from slmops.shared.bundle import key_id, load_public_key

    out = []
    for value in values:
        path = Path(value)
        out.append(key_id(load_public_key(path)) if path.is_file() else value)
    return out


def _load_root(path: Path) -> Ed25519PrivateKey:
    from slmops.shared.bundle import load_private_key

    return call(lambda: load_private_key(path))


def _change(
    nats_url: str, root: Ed25519PrivateKey, add: list[Path], status: dict[str, KeyStatus], action: str
) -> None:
    """Make the next list here (the root key stays on this machine) and ask the active cloud
    to write it (audited as ``action``); with no cloud running, write it here, unaudited."""
    from slmops.cli_common import jetstream
    from slmops.cloud.fleetconfig.client import request_change
    from slmops.cloud.keys import next_key_list, write_key_list
    from slmops.shared.audit import ChangeRequest
    from slmops.shared.bundle import load_public_key
    from slmops.shared.keylist import decode_signed, encode_public

    added = call(lambda: [load_public_key(p) for p in add])

    async def main() -> KeyList:
        async with jetstream(nats_url) as js:
            signed, revision = await next_key_list(js, root, add=added, status=status, url=nats_url)
        params = {"root": encode_public(root.public_key())}
        request = ChangeRequest(action=action, fleet="", document=signed.decode(), params=params)
        if await request_change(nats_url, request) is None:
            click.echo("note: no cloud answers: key list written directly, not audited", err=True)
            async with jetstream(nats_url) as js:
                await write_key_list(js, signed, revision, url=nats_url)
        return decode_signed(signed, [root.public_key()])

    new = run(main)
    assert new is not None
    click.echo(f"key list version {new.version} published (root {new.root}):")
    _print(new)


def _print(keylist: KeyList) -> None:
    widths = [18, 12, 26, 0]
    click.echo(table_line(["key id", "status", "not after", "note"], widths))
    for e in keylist.keys:
        after = "" if e.not_after is None else e.not_after.isoformat()[:19]
        click.echo(table_line([e.key_id, keylist.status(e.key_id) or "", after, e.note], widths))


@keys.command("init-root")
@out_dir_option("Directory for the root key pair (created).")
@click.option("--name", default="root", show_default=True, help="File name stem: NAME.key and NAME.pub.")
def init_root(out_dir: Path, name: str) -> None:
    """Make the fleet's root key: it signs only the key list. Keep NAME.key offline; give
    NAME.pub to every node once (`slmops edge --trust-root NAME.pub`)."""
    from slmops.shared.bundle import key_id, load_public_key, new_keypair

    priv, pub = call(lambda: new_keypair(out_dir, name))
    click.echo(f"root private key  {priv}  (keep offline)\nroot public key   {pub}")
    click.echo(f"root key id       {key_id(load_public_key(pub))}")


@keys.command()
@nats_option
@_root_option
@click.option(
    "--add", "add", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Public key (.pub) of a new bundle-signing key, listed as active; repeatable.",
)  # fmt: skip
@click.option(
    "--retire", "retire", multiple=True,
    help="Key (.pub file or key id) to retire in the same version: nodes install no new bundle "
    "signed by it and keep serving what runs; repeatable.",
)  # fmt: skip
def rotate(nats_url: str, root_path: Path, add: tuple[Path, ...], retire: tuple[str, ...]) -> None:
    """Publish the next version of the key list: add keys (--add) and retire old ones
    (--retire). Rotation is two runs: `--add NEW.pub`, sign and push new versions with NEW,
    then `--retire OLD.pub` once every assigned version is signed by NEW (README)."""
    if not add and not retire:
        raise click.UsageError("give --add NEW.pub and/or --retire OLD")
    status: dict[str, KeyStatus] = dict.fromkeys(call(lambda: _key_ids(retire)), "retired")
    _change(nats_url, _load_root(root_path), list(add), status, "keys.rotate")


@keys.command()
@nats_option
@_root_option
@click.argument("key")
@click.option(
    "--compromised",
    is_flag=True,
    help="The key leaked: nodes stop serving its bundles at once (falling back to a cached "
    "version with a trusted signer, else 503). Without it the key is retired.",
)
def revoke(nats_url: str, root_path: Path, key: str, compromised: bool) -> None:
    """Revoke KEY (a .pub file or a key id) in a new version of the key list: retired (no
    new installs of its bundles; what runs keeps running), or --compromised. `models push`
    refuses bundles signed by it either way."""
    (kid,) = call(lambda: _key_ids((key,)))
    _change(
        nats_url, _load_root(root_path), [], {kid: "compromised" if compromised else "retired"}, "keys.revoke"
    )


@keys.command(name="list")
@nats_option
@trust_option(
    "Root public key the list must verify against (else it is shown unverified).",
    envvar="SLMOPS_TRUST_ROOT",
    flag="--trust-root",
)
@click.option("--json", "as_json", is_flag=True, help="The signed document as stored.")
def list_(nats_url: str, trust_root: tuple[Path, ...], as_json: bool) -> None:
    """Show the key list held in KV slmops_keys: version, root, each key's status."""
    import msgspec

    from slmops.cli_common import jetstream
    from slmops.cloud.keys import read_key_list
    from slmops.shared.bundle import load_public_key
    from slmops.shared.keylist import KeyList, decode_signed

    roots = call(lambda: [load_public_key(p) for p in trust_root])

    async def main() -> bytes | None:
        async with jetstream(nats_url, provision=False) as js:
            return (await read_key_list(js, nats_url))[0]

    raw = run(main)
    if raw is None:
        raise click.ClickException("no key list in KV slmops_keys yet (`slmops keys rotate --add KEY.pub`)")
    if as_json:
        click.echo(json.dumps(json.loads(raw), indent=2))
        return
    if roots:
        keylist = call(lambda: decode_signed(raw, roots))
        checked = "verified"
    else:
        keylist = call(lambda: msgspec.json.decode(raw, type=KeyList))
        checked = "NOT verified (give --trust-root)"
    issued = f"{keylist.issued:%Y-%m-%d %H:%M}Z"
    click.echo(f"key list version {keylist.version}, root {keylist.root}, issued {issued}, {checked}")
    _print(keylist)
