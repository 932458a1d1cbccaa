"""NATS decentralized identities: NKeys, JWTs in the NATS format, and ``.creds`` files.

NATS's JWT authentication has three levels of ed25519 keys (NKeys, from the ``nkeys`` package
of the NATS project): an *operator* signs *account* JWTs, an account signs *user* JWTs, and a
client proves it holds the user's seed by signing the server's nonce. The server trusts only
the operator's public key; it needs no user list, so a device is enrolled without touching
any server and revoked by a new account JWT (its revocation list) pushed to the running
servers.

The token format is what nats-server 2.x checks (the ``nats-io/jwt`` v2 library): a header
``{"typ":"JWT","alg":"ed25519-nkey"}``, claims ``{jti, iat, iss, name, sub, nats: {..., type,
version: 2}}``, each part base64url without padding, and the ed25519 signature of
``header.claims`` by the issuer's seed, also base64url. ``jti`` is the base32 SHA-512/256 of
the claims with an empty ``jti``, as that library computes it. A user JWT signed by an
account *signing key* names the account in ``issuer_account``.

This module is the format only; which keys and rights slmops mints is ``cloud.trust``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nkeys  # type: ignore[import-untyped]

from slmops.shared.atomic import write_atomic

__all__ = [
    "Claims",
    "IdentityError",
    "KeyPair",
    "decode_jwt",
    "encode_jwt",
    "new_key",
    "read_creds",
    "read_seed",
    "write_creds",
    "write_secret",
]

Kind = Literal["operator", "account", "user"]

_PREFIX: dict[str, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
#: First letter of a public key, and of the seed's second character, per kind.
_LETTER = {"operator": "O", "account": "A", "user": "U"}

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


class IdentityError(ValueError):
    """A key, JWT or creds file that is malformed, of the wrong kind, or badly signed."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An NKey: ``public`` (``O…``/``A…``/``U…``, 56 characters) and its ``seed``
    (``SO…``/``SA…``/``SU…``; a secret)."""

    kind: Kind
    public: str
    seed: str

    def sign(self, data: bytes) -> bytes:
        """The 64-byte ed25519 signature of ``data``."""
        signature: bytes = nkeys.from_seed(self.seed.encode()).sign(data)
        return signature


def new_key(kind: Kind) -> KeyPair:
    """A fresh random NKey of ``kind`` (``os.urandom`` through PyNaCl)."""
    import nacl.signing

    raw = bytes(nacl.signing.SigningKey.generate())
    seed = nkeys.encode_seed(raw, _PREFIX[kind]).decode()
    return key_from_seed(seed, kind)


def key_from_seed(seed: str, kind: Kind) -> KeyPair:
    """The key pair of ``seed``; ``IdentityError`` when it is not a seed of ``kind``."""
    try:
        pair = nkeys.from_seed(seed.strip().encode())
        public = pair.public_key.decode()
    except Exception as exc:  # nkeys raises its own errors and binascii/nacl ones
        raise IdentityError(f"not a valid NKey seed ({type(exc).__name__})") from None
    if not public.startswith(_LETTER[kind]):
        raise IdentityError(f"seed is of a {public[0]!r} key, expected a {kind} key ({_LETTER[kind]}…)")
    return KeyPair(kind, public, seed.strip())


def read_seed(path: Path, kind: Kind) -> KeyPair:
    """The key pair whose seed is the first ``S…`` line of the file at ``path``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for line in text.splitlines():
        if line.strip().startswith("S"):
            try:
                return key_from_seed(line, kind)
            except IdentityError as exc:
                raise IdentityError(f"{path}: {exc}") from None
    raise IdentityError(f"{path}: holds no NKey seed (a line starting with 'S')")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


@dataclass(frozen=True, slots=True)
class Claims:
    """A decoded JWT: ``subject`` and ``issuer`` public keys, ``issued_at`` (unix seconds),
    ``name``, and ``nats`` (the type-specific part, as a dict)."""

    subject: str
    issuer: str
    issued_at: int
    name: str
    nats: dict[str, Any]
    jti: str

    @property
    def kind(self) -> str:
        return str(self.nats.get("type", ""))


def encode_jwt(
    kind: Kind,
    subject: str,
    name: str,
    nats: dict[str, Any],
    signer: KeyPair,
    *,
    issued_at: int | None = None,
) -> str:
    """A signed JWT of ``kind`` about ``subject`` (a public key), issued by ``signer``.

    ``nats`` is the type-specific part (``limits``, ``signing_keys``, ``pub``/``sub``...);
    ``type`` and ``version`` are set here. An operator JWT is self-signed by the operator or
    one of its signing keys; an account JWT by an operator key; a user JWT by an account key
    (with ``issuer_account`` in ``nats`` when that is a signing key, not the account itself).
    ``issued_at`` defaults to now (revocations compare with it, in seconds).
    """
    if not subject.startswith(_LETTER[kind]):
        raise IdentityError(f"a {kind} JWT's subject must be a {kind} public key, got {subject[:1]!r}…")
    want_signer = {"operator": "operator", "account": "operator", "user": "account"}[kind]
    if signer.kind != want_signer:
        raise IdentityError(f"a {kind} JWT is signed by an {want_signer} key, not a {signer.kind} key")
    body: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()) if issued_at is None else int(issued_at),
        "iss": signer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "type": kind, "version": 2},
    }
    digest = hashlib.new("sha512_256", _dumps(body)).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = f"{_b64(_dumps(_HEADER))}.{_b64(_dumps(body))}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode_jwt(token: str, *, verify: bool = True) -> Claims:
    """The claims of a NATS JWT; with ``verify`` the signature must be the issuer's.
    ``IdentityError`` for anything malformed or a bad signature."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise IdentityError("a JWT has three dot-separated parts")
    try:
        header = json.loads(_unb64(parts[0]))
        body = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except ValueError:
        raise IdentityError("JWT part is not base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") not in ("ed25519-nkey", "ed25519"):
        raise IdentityError(
            f"JWT algorithm {header.get('alg') if isinstance(header, dict) else None!r} is not ed25519-nkey"
        )
    if not isinstance(body, dict) or not isinstance(body.get("nats"), dict):
        raise IdentityError("JWT claims hold no 'nats' object")
    issuer, subject = body.get("iss"), body.get("sub")
    if not isinstance(issuer, str) or not isinstance(subject, str):
        raise IdentityError("JWT claims lack 'iss' or 'sub'")
    if verify:
        try:
            _verify_key(issuer).verify(f"{parts[0]}.{parts[1]}".encode(), signature)
        except Exception:  # nacl's BadSignatureError, a malformed key ...
            raise IdentityError(f"JWT signature does not verify against its issuer {issuer[:8]}…") from None
    return Claims(
        subject=subject,
        issuer=issuer,
        issued_at=int(body.get("iat", 0)),
        name=str(body.get("name", "")),
        nats=body["nats"],
        jti=str(body.get("jti", "")),
    )


def _verify_key(public: str) -> Any:
    """PyNaCl's verify key of an NKey public key (``nkeys`` verifies only with a seed):
    base32 of prefix byte + 32 key bytes + CRC-16, checked."""
    import nacl.signing

    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise IdentityError(f"{public[:8]}… is not an NKey public key")
    if int.from_bytes(raw[-2:], "little") != nkeys.crc16(bytearray(raw[:-2])):
        raise IdentityError(f"{public[:8]}…: checksum mismatch")
    return nacl.signing.VerifyKey(raw[1:33])


_CREDS = """\
-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""

_BLOCK = re.compile(r"-{3,}BEGIN [^\n]*-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END [^\n]*-{3,}")


def write_creds(path: Path, jwt: str, user: KeyPair) -> None:
    """Write a ``.creds`` file (the user JWT and its seed, the format nats-py's
    ``user_credentials`` and the ``nats`` CLI read), mode 0600, replacing atomically."""
    if user.kind != "user":
        raise IdentityError(f"a creds file holds a user key, not a {user.kind} key")
    write_secret(path, _CREDS.format(jwt=jwt, seed=user.seed))


def read_creds(path: Path) -> tuple[str, KeyPair]:
    """(user JWT, user key pair) of a ``.creds`` file; ``IdentityError`` when it is not one
    or the seed does not belong to the JWT's subject."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    blocks = _BLOCK.findall(text)
    if len(blocks) < 2:
        raise IdentityError(f"{path}: not a NATS creds file (needs a user JWT block and a seed block)")
    jwt, seed = blocks[0], blocks[1]
    try:
        claims = decode_jwt(jwt)
        user = key_from_seed(seed, "user")
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from None
    if claims.subject != user.public:
        raise IdentityError(f"{path}: the seed is not the key of the JWT's user")
    return jwt, user


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 from the start (never briefly readable
    by others; see ``slmops.shared.atomic.write_atomic``). Raises ``OSError``."""
    write_atomic(path, text.encode(), prefix=f".{path.name}.")
