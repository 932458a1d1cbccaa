"""The model bundle: a directory holding ``model.onnx`` and ``manifest.json``, or the same two
files in one uncompressed tar archive for transport. The manifest carries the model's sha256 and
an Ed25519 signature over its canonical bytes (sorted-key JSON without the signature).

Keys are PEM files: ``<name>.key`` (PKCS#8 private) and ``<name>.pub`` (SubjectPublicKeyInfo);
a key's id is the first 16 hex digits of the sha256 of its raw public bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slmops.shared.errors import BundleError
from slmops.shared.messages import ModelManifest, Signature

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "Bundle",
    "TrustStore",
    "canonical_bytes",
    "key_id",
    "load_private_key",
    "load_public_key",
    "new_keypair",
    "pack_archive",
    "read_bundle",
    "sha256_file",
    "sign_manifest",
    "unpack_archive",
    "write_bundle",
]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
_manifest_decoder = msgspec.json.Decoder(ModelManifest)


class Bundle(msgspec.Struct, frozen=True):
    """A bundle on disk: its directory and its parsed (not yet verified) manifest."""

    path: Path
    manifest: ModelManifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def canonical_bytes(manifest: ModelManifest) -> bytes:
    """The bytes a signature covers: sorted-key JSON of the manifest without its signature.

    The manifest is normalised through one JSON round trip first, so a value built in memory
    (``0`` in a float list, say) signs the same bytes as the one read back from disk."""
    unsigned = msgspec.json.encode(msgspec.structs.replace(manifest, signature=None))
    return msgspec.json.encode(_manifest_decoder.decode(unsigned), order="sorted")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_keypair(out_dir: Path, name: str = "slmops") -> tuple[Path, Path]:
    """Write ``<name>.key`` (mode 0600) and ``<name>.pub`` into ``out_dir``; refuse to overwrite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read private key {str(path)!r}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"key {str(path)!r} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read public key {str(path)!r}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"key {str(path)!r} is not an Ed25519 public key")
    return key


class TrustStore:
    """The public keys a node accepts bundle signatures from."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TrustStore:
        return cls(load_public_key(Path(p)) for p in paths)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, manifest: ModelManifest, where: str = "bundle") -> None:
        """Raise ``BundleError`` (code ``unsigned``, ``unknown_key`` or ``bad_signature``)."""
        sig = manifest.signature
        if sig is None:
            raise BundleError(where, "manifest is not signed", code="unsigned")
        if sig.algorithm != "ed25519":
            raise BundleError(where, f"unsupported signature algorithm {sig.algorithm!r}", "bad_signature")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise BundleError(
                where,
                f"signed by key {sig.key_id!r}, which is not trusted (trusted: {self.key_ids})",
                code="unknown_key",
            )
        try:
            key.verify(base64.b64decode(sig.value, validate=True), canonical_bytes(manifest))
        except (InvalidSignature, ValueError) as exc:
            raise BundleError(where, "signature does not match the manifest", "bad_signature") from exc


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> ModelManifest:
    value = base64.b64encode(key.sign(canonical_bytes(manifest))).decode()
    return msgspec.structs.replace(
        manifest, signature=Signature(key_id=key_id(key.public_key()), value=value)
    )


def read_bundle(path: Path) -> Bundle:
    """Parse a bundle directory's manifest; checks only that it parses and the model exists."""
    path = Path(path)
    where = str(path)
    try:
        manifest = _manifest_decoder.decode((path / MANIFEST_FILE).read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(where, f"no {MANIFEST_FILE} in the bundle", "invalid") from exc
    except msgspec.ValidationError as exc:
        raise BundleError(where, f"manifest is invalid: {exc}", "invalid") from exc
    except msgspec.DecodeError as exc:
        raise BundleError(where, f"manifest is not valid JSON: {exc}", "invalid") from exc
    if not (path / MODEL_FILE).is_file():
        raise BundleError(where, f"no {MODEL_FILE} in the bundle", "invalid")
    return Bundle(path=path, manifest=manifest)


def check_hash(bundle: Bundle) -> None:
    """Raise ``BundleError`` (``hash_mismatch``/``truncated``) unless the model matches."""
    m = bundle.manifest
    size = bundle.model_path.stat().st_size
    if size != m.size_bytes:
        raise BundleError(
            str(bundle.path), f"model is {size} bytes, manifest says {m.size_bytes}", "truncated"
        )
    digest = sha256_file(bundle.model_path)
    if digest != m.sha256:
        raise BundleError(
            str(bundle.path),
            f"model sha256 {digest} does not match manifest {m.sha256}",
            "hash_mismatch",
        )


def write_bundle(
    out_dir: Path, model_bytes: bytes, manifest: ModelManifest, key: Ed25519PrivateKey
) -> Bundle:
    """Write model and signed manifest (hash and size filled in here) atomically-ish into
    ``out_dir``, which must not exist yet or be empty."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = msgspec.structs.replace(
        manifest,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        size_bytes=len(model_bytes),
        signature=None,
    )
    signed = sign_manifest(manifest, key)
    _atomic_write(out_dir / MODEL_FILE, model_bytes)
    _atomic_write(out_dir / MANIFEST_FILE, msgspec.json.format(msgspec.json.encode(signed)))
    return Bundle(path=out_dir, manifest=signed)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pack_archive(bundle: Bundle) -> bytes:
    """The single-file transport form: an uncompressed tar of manifest and model."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in (MANIFEST_FILE, MODEL_FILE):
            tar.add(bundle.path / name, arcname=name)
    return buf.getvalue()


def unpack_archive(archive: Path, out_dir: Path) -> Bundle:
    """Extract an archive made by ``pack_archive`` into ``out_dir``; only the two known
    regular files are accepted (no paths, links or extras)."""
    where = str(archive)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
            names = sorted(m.name for m in members)
            if names != sorted([MANIFEST_FILE, MODEL_FILE]) or not all(m.isfile() for m in members):
                raise BundleError(
                    where,
                    f"archive must hold exactly {MANIFEST_FILE} and {MODEL_FILE}, has {names}",
                    "invalid",
                )
            for m in members:
                src = tar.extractfile(m)
                if src is None:
                    raise BundleError(where, f"cannot read {m.name} from the archive", "invalid")
                (out_dir / m.name).write_bytes(src.read())
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(where, f"archive is damaged or truncated: {exc}", "truncated") from exc
    return read_bundle(out_dir)
