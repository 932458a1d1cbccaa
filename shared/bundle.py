"""The model bundle: a directory holding ``manifest.json`` and the files it lists, or the same
files in one uncompressed tar archive for transport (``manifest.json`` first).

A legacy bundle lists no files: it is ``model.onnx``, described by the manifest's ``sha256`` and
``size_bytes``. A multi-file bundle lists every file (path, sha256, size, role) in
``manifest.files``; a file in the directory or archive that is not listed, or listed and
missing, refuses the bundle.

The manifest carries an Ed25519 signature over the canonical form of its RAW JSON document:
parsed as generic JSON (never into the manifest Struct), the ``signature`` member dropped,
encoded with sorted keys. Fields this build does not know are therefore signed and verified
like the others, and a field added later never breaks an existing signature. Bundles signed
by builds up to 06cfd20 (which signed the decoded Struct, ``signature: null`` included) still
verify through ``_legacy_canonical``, which rebuilds exactly those bytes.

Keys are PEM files: ``<name>.key`` (PKCS#8 private) and ``<name>.pub`` (SubjectPublicKeyInfo);
a key's id is the first 16 hex digits of the sha256 of its raw public bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slmops.shared.atomic import write_atomic
from slmops.shared.capabilities import requirements_of
from slmops.shared.errors import BundleError
from slmops.shared.messages import (
    BundleFile,
    HistogramEdges,
    ModelManifest,
    Preprocessing,
    ReferenceProfile,
    Signature,
    SmokeTest,
    TensorSpec,
)
from slmops.shared.vocabulary import BundleCode

__all__ = [
    "MANIFEST_FILE",
    "MAX_MANIFEST_BYTES",
    "MODEL_FILE",
    "Bundle",
    "FileData",
    "TrustStore",
    "bundle_files",
    "canonical_bytes",
    "check_files",
    "check_hash",
    "check_path",
    "key_id",
    "load_private_key",
    "load_public_key",
    "new_keypair",
    "pack_archive",
    "parse_manifest",
    "read_bundle",
    "resign_bundle",
    "sha256_file",
    "sign_manifest",
    "sign_manifest_bytes",
    "signer_of",
    "unpack_archive",
    "write_bundle",
]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
#: A manifest larger than this is refused before it is parsed (the largest real ones, with
#: held-out scores, are ~0.1-1 MB).
MAX_MANIFEST_BYTES = 16 << 20
#: Roles a bundle file may have.
ROLES = frozenset({"model", "head", "tokenizer", "data", "genai_config"})
_manifest_decoder = msgspec.json.Decoder(ModelManifest)


class Bundle(msgspec.Struct, frozen=True):
    """A bundle on disk: its directory, its parsed (not yet verified) manifest and the raw
    manifest bytes the signature is checked against."""

    path: Path
    manifest: ModelManifest
    raw: bytes = b""

    @property
    def files(self) -> list[BundleFile]:
        return bundle_files(self.manifest)

    def file(self, role: str) -> Path | None:
        """Path of the (first) file with ``role``, or None."""
        for f in self.files:
            if f.role == role:
                return self.path / f.path
        return None

    @property
    def model_path(self) -> Path:
        return self.file("model") or self.path / MODEL_FILE


def bundle_files(manifest: ModelManifest) -> list[BundleFile]:
    """The files a manifest describes: ``files``, or the legacy ``model.onnx``."""
    if manifest.files:
        return list(manifest.files)
    return [BundleFile(path=MODEL_FILE, sha256=manifest.sha256, size_bytes=manifest.size_bytes, role="model")]


# -- signatures ----------------------------------------------------------------------------


def _document(raw: bytes, where: str = "manifest") -> dict[str, Any]:
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BundleError(where, f"manifest is not valid JSON: {exc}", BundleCode.INVALID) from exc
    if not isinstance(doc, dict):
        raise BundleError(where, "manifest is not a JSON object", BundleCode.INVALID)
    return doc


def _raw_of(manifest: bytes | ModelManifest) -> bytes:
    return manifest if isinstance(manifest, bytes) else msgspec.json.encode(manifest)


def canonical_bytes(manifest: bytes | ModelManifest) -> bytes:
    """The bytes a signature covers: the raw manifest JSON parsed as a generic document, its
    ``signature`` member dropped, re-encoded with sorted keys. A Struct stands for its own
    JSON encoding (what ``write_bundle`` writes)."""
    doc = _document(_raw_of(manifest))
    doc.pop("signature", None)
    return msgspec.json.encode(doc, order="sorted")


def _prune(full: Any, doc: Any) -> Any:
    """``full`` restricted to the members ``doc`` has (recursively)."""
    if isinstance(full, dict) and isinstance(doc, dict):
        return {k: _prune(v, doc[k]) for k, v in full.items() if k in doc}
    if isinstance(full, list) and isinstance(doc, list) and len(full) == len(doc):
        return [_prune(a, b) for a, b in zip(full, doc, strict=True)]
    return full


def _legacy_canonical(raw: bytes) -> bytes | None:
    """What builds up to 06cfd20 signed: the manifest decoded into the Struct of that time,
    re-encoded with ``signature: null`` and sorted keys. Rebuilt as the current Struct's
    encoding restricted to the members the document has (fields added since are absent from
    an old document), so ints in float fields become floats exactly as they did then."""
    try:
        decoded = _manifest_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    full = msgspec.json.decode(msgspec.json.encode(msgspec.structs.replace(decoded, signature=None)))
    legacy = _prune(full, _document(raw))
    _strip_new(legacy, strict=False)  # at its default a new field means what its absence meant
    legacy["signature"] = None
    return msgspec.json.encode(legacy, order="sorted")


def _signature_value(key: Ed25519PrivateKey, raw: bytes) -> Signature:
    value = base64.b64encode(key.sign(canonical_bytes(raw))).decode()
    return Signature(key_id=key_id(key.public_key()), value=value)


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> ModelManifest:
    """``manifest`` with a signature over its canonical bytes (as ``write_bundle`` writes it).

    The manifest is normalised through one JSON round trip first (``0`` in a float list
    becomes ``0.0``), so the Struct read back from disk encodes to the very bytes signed."""
    unsigned = _manifest_decoder.decode(
        msgspec.json.encode(msgspec.structs.replace(manifest, signature=None))
    )
    return msgspec.structs.replace(unsigned, signature=_signature_value(key, msgspec.json.encode(unsigned)))


#: The fields of the manifest (and of its nested messages) as build 06cfd20 knew them: any
#: other field is newer, and means "as before" only at its default value.
_OLD_MANIFEST = frozenset(
    {
        "v", "name", "version", "variant", "sha256", "size_bytes", "inputs", "outputs", "preprocessing",
        "labels", "edges", "reference", "smoke_tests", "min_memory_mb", "parent_version", "created",
        "notes", "signature",
    }
)  # fmt: skip
_OLD_REFERENCE = frozenset(
    {
        "count", "class_counts", "confidence", "input_length", "latency_ms", "accuracy", "confusion",
        "priors", "source", "held_out",
    }
)  # fmt: skip
_OLD_PREPROCESSING = frozenset({"kind", "buckets", "max_tokens", "word_ngrams", "char_ngrams", "lowercase"})
_OLD_TENSOR = frozenset({"name", "dtype", "shape"})
_LEGACY_FIELDS: dict[str, tuple[type[msgspec.Struct], frozenset[str]]] = {
    "": (ModelManifest, _OLD_MANIFEST),
    "preprocessing": (Preprocessing, _OLD_PREPROCESSING),
    "reference": (ReferenceProfile, _OLD_REFERENCE),
    "edges": (HistogramEdges, frozenset({"confidence", "input_length", "latency_ms"})),
    "inputs[]": (TensorSpec, _OLD_TENSOR),
    "outputs[]": (TensorSpec, _OLD_TENSOR),
    "smoke_tests[]": (SmokeTest, frozenset({"text", "label", "probs", "tolerance"})),
}


def _default(struct: type[msgspec.Struct], name: str) -> Any:
    for f in msgspec.structs.fields(struct):
        if f.name == name:
            if f.default is not msgspec.NODEFAULT:
                return msgspec.to_builtins(f.default)
            if f.default_factory is not msgspec.NODEFAULT:
                return msgspec.to_builtins(f.default_factory())
    return msgspec.NODEFAULT  # required, or unknown to this build: never "as before"


def _strip_new(doc: dict[str, Any], *, strict: bool) -> None:
    """Remove, in place, the fields 06cfd20 did not know that hold their default value; with
    ``strict``, raise ``ValueError`` for one that does not."""
    for path, (struct, known) in _LEGACY_FIELDS.items():
        if not path:
            targets = [doc]
        elif path.endswith("[]"):
            items = doc.get(path[:-2])
            targets = [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []
        else:
            targets = [doc[path]] if isinstance(doc.get(path), dict) else []
        for where in targets:
            for name in [k for k in where if k not in known]:
                if where[name] == _default(struct, name):
                    del where[name]
                elif strict:
                    raise ValueError(f"field {name!r} is set: not a bundle for the legacy runtime")


def _legacy_signed(manifest: ModelManifest, key: Ed25519PrivateKey) -> bytes:
    """The raw manifest of a bundle the n-gram runtime can run, in the form builds up to
    06cfd20 wrote and verified: no field they did not know (each is at its default here),
    signed over the sorted-key JSON with ``signature: null``. This build verifies it through
    ``_legacy_canonical``."""
    unsigned = _manifest_decoder.decode(
        msgspec.json.encode(msgspec.structs.replace(manifest, signature=None))
    )
    doc = msgspec.json.decode(msgspec.json.encode(unsigned))
    _strip_new(doc, strict=True)
    doc["signature"] = None
    value = base64.b64encode(key.sign(msgspec.json.encode(doc, order="sorted"))).decode()
    doc["signature"] = msgspec.to_builtins(Signature(key_id=key_id(key.public_key()), value=value))
    return msgspec.json.format(msgspec.json.encode(doc))


def sign_manifest_bytes(raw: bytes, key: Ed25519PrivateKey) -> bytes:
    """Sign a raw manifest document as it is (members this build does not know included);
    return the document with its ``signature`` member set."""
    doc = _document(raw)
    doc.pop("signature", None)
    sig = _signature_value(key, msgspec.json.encode(doc))
    doc["signature"] = msgspec.to_builtins(sig)
    return msgspec.json.format(msgspec.json.encode(doc))


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
    """The public keys a node accepts bundle signatures from, and the keys revoked by the
    fleet's key list (``shared.keylist``): key id -> ``"retired"`` (refused for installs,
    still accepted by the ``serving()`` view, which checks what already runs) or
    ``"compromised"`` (refused for both)."""

    def __init__(
        self,
        keys: Iterable[Ed25519PublicKey] = (),
        *,
        revoked: Mapping[str, str] | None = None,
        serving: bool = False,
    ) -> None:
        self._revoked = dict(revoked or {})
        self._keys = {kid: k for k in keys if self._revoked.get(kid := key_id(k)) != "compromised"}
        self._serving = serving

    def serving(self) -> TrustStore:
        """This store as it judges bundles a node already serves: retired keys still count."""
        return TrustStore(self._keys.values(), revoked=self._revoked, serving=True)

    def status_of(self, kid: str) -> str:
        """``"trusted"``, ``"retired"``, ``"compromised"`` or ``"unknown"`` for key id ``kid``."""
        if kid in self._revoked:
            return self._revoked[kid]
        return "trusted" if kid in self._keys else "unknown"

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TrustStore:
        return cls(load_public_key(Path(p)) for p in paths)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def revoked(self) -> dict[str, str]:
        """Key id -> ``"retired"`` or ``"compromised"``, as the key list says."""
        return dict(self._revoked)

    @property
    def public_keys(self) -> list[Ed25519PublicKey]:
        """The trusted keys (compromised ones excluded)."""
        return list(self._keys.values())

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def _key_for(self, sig: Signature | None, where: str) -> Ed25519PublicKey:
        """The trusted key ``sig`` names. Raises ``BundleError`` (code ``unsigned``,
        ``unknown_key`` or ``bad_signature`` for an algorithm other than Ed25519)."""
        if sig is None:
            raise BundleError(where, "not signed", code=BundleCode.UNSIGNED)
        if sig.algorithm != "ed25519":
            raise BundleError(
                where, f"unsupported signature algorithm {sig.algorithm!r}", BundleCode.BAD_SIGNATURE
            )
        revoked = self._revoked.get(sig.key_id)
        if revoked == "compromised" or (revoked == "retired" and not self._serving):
            what = "serves no bundle of it" if revoked == "compromised" else "installs no new bundle of it"
            raise BundleError(
                where,
                f"signed by key {sig.key_id!r}, which the key list marks {revoked}: this node {what}",
                code=BundleCode.REVOKED_KEY,
            )
        key = self._keys.get(sig.key_id)
        if key is None:
            raise BundleError(
                where,
                f"signed by key {sig.key_id!r}, which is not trusted (trusted: {self.key_ids})",
                code=BundleCode.UNKNOWN_KEY,
            )
        return key

    def verify_detached(self, data: bytes, sig: Signature | None, where: str) -> None:
        """Check ``sig`` over ``data`` (signed data other than a manifest, e.g. a fleet
        configuration: ``shared.fleetconfig``). Raises ``BundleError`` (code ``unsigned``,
        ``unknown_key`` or ``bad_signature``) naming ``where``."""
        key = self._key_for(sig, where)
        assert sig is not None  # _key_for refused None
        try:
            key.verify(base64.b64decode(sig.value, validate=True), data)
        except (ValueError, InvalidSignature) as exc:
            raise BundleError(where, "signature does not match", BundleCode.BAD_SIGNATURE) from exc

    def verify(self, manifest: Bundle | bytes | ModelManifest, where: str = "bundle") -> None:
        """Check the signature of a bundle's raw manifest bytes (a Struct stands for its own
        encoding, as signed by ``sign_manifest``). Raise ``BundleError`` (code ``unsigned``,
        ``unknown_key`` or ``bad_signature``)."""
        if isinstance(manifest, Bundle):
            raw = manifest.raw or msgspec.json.encode(manifest.manifest)
        else:
            raw = _raw_of(manifest)
        doc = _document(raw, where)
        try:
            sig = msgspec.convert(doc.get("signature"), Signature | None)
        except msgspec.ValidationError as exc:
            raise BundleError(
                where, f"manifest signature is malformed: {exc}", BundleCode.BAD_SIGNATURE
            ) from exc
        if sig is None:
            raise BundleError(where, "manifest is not signed", code=BundleCode.UNSIGNED)
        key = self._key_for(sig, where)
        try:
            value = base64.b64decode(sig.value, validate=True)
        except ValueError as exc:
            raise BundleError(where, "signature is not base64", BundleCode.BAD_SIGNATURE) from exc
        for signed in (canonical_bytes(raw), _legacy_canonical(raw)):
            if signed is None:
                continue
            try:
                key.verify(value, signed)
                return
            except InvalidSignature:
                continue
        raise BundleError(where, "signature does not match the manifest", BundleCode.BAD_SIGNATURE)


def signer_of(manifest: Bundle | bytes | ModelManifest) -> str | None:
    """The key id a manifest says signed it (None when unsigned or unreadable); not verified."""
    if isinstance(manifest, Bundle):
        raw = manifest.raw or msgspec.json.encode(manifest.manifest)
    else:
        raw = _raw_of(manifest)
    try:
        sig = _document(raw).get("signature")
    except BundleError:
        return None
    kid = sig.get("key_id") if isinstance(sig, dict) else None
    return kid if isinstance(kid, str) else None


# -- reading and writing directories ---------------------------------------------------------


def check_path(path: str, where: str = "bundle") -> PurePosixPath:
    """A listed file path, validated: relative, "/"-separated, no "." or ".." parts, not the
    manifest itself. Raises ``BundleError`` (``invalid``)."""
    p = PurePosixPath(path)
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
        or path == MANIFEST_FILE
        or len(path) > 255
    ):
        raise BundleError(
            where, f"file path {path!r} is not a plain relative path inside the bundle", BundleCode.INVALID
        )
    return p


def _listed(manifest: ModelManifest, where: str) -> dict[str, BundleFile]:
    files = bundle_files(manifest)
    listed: dict[str, BundleFile] = {}
    for f in files:
        check_path(f.path, where)
        if f.path in listed:
            raise BundleError(where, f"file {f.path!r} is listed twice", BundleCode.INVALID)
        if f.role and f.role not in ROLES:
            raise BundleError(where, f"file {f.path!r} has unknown role {f.role!r} (known: {sorted(ROLES)})")
        if f.size_bytes < 0:
            raise BundleError(where, f"file {f.path!r} has a negative size", BundleCode.INVALID)
        listed[f.path] = f
    if manifest.files and not any(f.role == "model" for f in files):
        raise BundleError(where, "no file with role 'model' is listed", BundleCode.INVALID)
    return listed


def _decode_manifest(raw: bytes, where: str) -> ModelManifest:
    try:
        return _manifest_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise BundleError(where, f"manifest is invalid: {exc}", BundleCode.INVALID) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BundleError(where, f"manifest is not valid JSON: {exc}", BundleCode.INVALID) from exc


def parse_manifest(path: Path, raw: bytes, where: str = "bundle") -> Bundle:
    """A ``Bundle`` at ``path`` from raw manifest bytes: decoded and its file list validated
    (paths, roles), the files themselves not looked at. Raises ``BundleError`` (``invalid``)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(
            where, f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes", BundleCode.INVALID
        )
    manifest = _decode_manifest(raw, where)
    _listed(manifest, where)
    return Bundle(path=Path(path), manifest=manifest, raw=raw)


def read_bundle(path: Path) -> Bundle:
    """Parse a bundle directory's manifest and check its file list against the directory: every
    listed file present as a regular file, nothing else there. Hashes are ``check_files``'s
    job. Raises ``BundleError`` (``invalid``)."""
    path = Path(path)
    where = str(path)
    try:
        with (path / MANIFEST_FILE).open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as exc:
        raise BundleError(where, f"no {MANIFEST_FILE} in the bundle", BundleCode.INVALID) from exc
    except OSError as exc:
        raise BundleError(where, f"cannot read {MANIFEST_FILE}: {exc}", BundleCode.INVALID) from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(
            where, f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes", BundleCode.INVALID
        )
    manifest = _decode_manifest(raw, where)
    listed = _listed(manifest, where)
    for name in listed:
        p = path / name
        if p.is_symlink() or not p.is_file():
            raise BundleError(where, f"listed file {name!r} is missing from the bundle", BundleCode.INVALID)
    dirs = {str(parent) for name in listed for parent in PurePosixPath(name).parents} - {"."}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if rel == MANIFEST_FILE or rel in listed or (rel in dirs and p.is_dir() and not p.is_symlink()):
            continue
        raise BundleError(
            where, f"file {rel!r} is in the bundle but not listed in its manifest", BundleCode.INVALID
        )
    return Bundle(path=path, manifest=manifest, raw=raw)


def check_files(bundle: Bundle) -> None:
    """Raise ``BundleError`` (``truncated``/``hash_mismatch``) unless every file's size and
    sha256 match the manifest."""
    for f in bundle.files:
        p = bundle.path / f.path
        size = p.stat().st_size
        if size != f.size_bytes:
            raise BundleError(
                str(bundle.path),
                f"{f.path} is {size} bytes, manifest says {f.size_bytes}",
                BundleCode.TRUNCATED,
            )
        digest = sha256_file(p)
        if digest != f.sha256:
            raise BundleError(
                str(bundle.path),
                f"{f.path} sha256 {digest} does not match manifest {f.sha256}",
                BundleCode.HASH_MISMATCH,
            )


#: The name of ``check_files`` before bundles had several files.
check_hash = check_files


@dataclass(frozen=True, slots=True)
class FileData:
    """One file to write into a bundle: its bundle path, bytes (or a file to copy) and role."""

    path: str
    data: bytes | Path
    role: str = ""


def write_bundle(
    out_dir: Path,
    model: bytes | Sequence[FileData],
    manifest: ModelManifest,
    key: Ed25519PrivateKey,
) -> Bundle:
    """Write the files and the signed manifest into ``out_dir`` (created; each file replaced
    atomically). ``model`` as bytes writes a legacy single-file bundle (``model.onnx``, hash
    and size in ``sha256``/``size_bytes``); a sequence of ``FileData`` writes a multi-file
    bundle whose ``files`` list them (the "model" file's hash and size also go to
    ``sha256``/``size_bytes``). ``requires`` is filled from the manifest when None."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, bytes):
        manifest = msgspec.structs.replace(
            manifest, sha256=hashlib.sha256(model).hexdigest(), size_bytes=len(model), files=[]
        )
        _atomic_write(out_dir / MODEL_FILE, model)
    else:
        listed: list[BundleFile] = []
        for item in model:
            check_path(item.path, str(out_dir))
            data = item.data if isinstance(item.data, bytes) else Path(item.data).read_bytes()
            target = out_dir / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, data)
            listed.append(
                BundleFile(
                    path=item.path,
                    sha256=hashlib.sha256(data).hexdigest(),
                    size_bytes=len(data),
                    role=item.role,
                )
            )
        main = next((f for f in listed if f.role == "model"), None)
        if main is None:
            raise ValueError("a multi-file bundle needs one file with role 'model'")
        manifest = msgspec.structs.replace(
            manifest, files=listed, sha256=main.sha256, size_bytes=main.size_bytes
        )
    if requirements_of(manifest).min_runtime <= 1 and not manifest.files:
        # Runnable by the n-gram runtime: written and signed as builds up to 06cfd20 did, so
        # nodes still running them verify it (they sign/verify the decoded Struct).
        raw = _legacy_signed(manifest, key)
        signed = _manifest_decoder.decode(raw)
    else:
        if manifest.requires is None:
            manifest = msgspec.structs.replace(manifest, requires=requirements_of(manifest))
        signed = sign_manifest(manifest, key)
        raw = msgspec.json.format(msgspec.json.encode(signed))
    _atomic_write(out_dir / MANIFEST_FILE, raw)
    return Bundle(path=out_dir, manifest=signed, raw=raw)


def resign_bundle(path: Path, key: Ed25519PrivateKey) -> Bundle:
    """Re-sign a bundle directory in place after an edit: hashes and sizes of the files it
    lists recomputed, manifest signed with ``key``."""
    b = read_bundle(path)
    if not b.manifest.files:
        return write_bundle(path, b.model_path.read_bytes(), b.manifest, key)
    items = [FileData(f.path, (path / f.path).read_bytes(), f.role) for f in b.manifest.files]
    return write_bundle(path, items, b.manifest, key)


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomic(path, data, prefix=f".{path.name}.")


# -- the archive -----------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # deterministic bytes: the same bundle packs to the same archive
    return info


def pack_archive(bundle: Bundle) -> bytes:
    """The single-file transport form: an uncompressed tar of the raw manifest (first) and
    the listed files, in manifest order."""
    buf = io.BytesIO()
    raw = bundle.raw or msgspec.json.format(msgspec.json.encode(bundle.manifest))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(_tarinfo(MANIFEST_FILE, len(raw)), io.BytesIO(raw))
        for f in bundle.files:
            p = bundle.path / f.path
            with p.open("rb") as src:
                tar.addfile(_tarinfo(f.path, p.stat().st_size), src)
    return buf.getvalue()


def _copy_capped(src: IO[bytes], out: Path, entry: BundleFile, where: str) -> None:
    """Stream ``entry.size_bytes`` bytes from ``src`` into ``out``, hashing as they come."""
    h = hashlib.sha256()
    left = entry.size_bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as dst:
        while left > 0:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise BundleError(
                    where, f"{entry.path} ends {left} bytes early in the archive", BundleCode.TRUNCATED
                )
            h.update(chunk)
            dst.write(chunk)
            left -= len(chunk)
    if h.hexdigest() != entry.sha256:
        raise BundleError(
            where,
            f"{entry.path} sha256 {h.hexdigest()} does not match manifest {entry.sha256}",
            BundleCode.HASH_MISMATCH,
        )


def unpack_archive(archive: Path | BinaryIO, out_dir: Path, trust: TrustStore | None = None) -> Bundle:
    """Extract an archive made by ``pack_archive`` into ``out_dir``, checking as it streams.

    The manifest must come first; with ``trust`` its signature is verified before any other
    byte is read. Each further member must be a regular file the manifest lists, not seen
    before, whose header declares exactly the listed size; it is streamed to disk capped at
    that size and hashed on the way (a sparse member declaring 1 GiB is refused from its
    header, nothing inflated). A listed file missing from the archive refuses it too.
    Raises ``BundleError``: ``invalid``, ``truncated``, ``hash_mismatch`` or a signature code.
    """
    where = str(archive) if isinstance(archive, Path) else "archive"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with (
            tarfile.open(archive, mode="r|")
            if isinstance(archive, Path)
            else tarfile.open(fileobj=archive, mode="r|")
        ) as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST_FILE or not first.isreg() or first.issparse():
                raise BundleError(where, f"archive must start with {MANIFEST_FILE}", BundleCode.INVALID)
            if first.size > MAX_MANIFEST_BYTES:
                raise BundleError(
                    where, f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes", BundleCode.INVALID
                )
            src = tar.extractfile(first)
            raw = src.read() if src is not None else b""
            if len(raw) != first.size:
                raise BundleError(where, f"{MANIFEST_FILE} is cut short in the archive", BundleCode.TRUNCATED)
            manifest = _decode_manifest(raw, where)
            if trust is not None:
                trust.verify(raw, where)
            listed = _listed(manifest, where)
            seen: set[str] = set()
            while (member := tar.next()) is not None:
                name = member.name
                entry = listed.get(name)
                if entry is None:
                    raise BundleError(
                        where, f"archive member {name!r} is not listed in the manifest", BundleCode.INVALID
                    )
                if name in seen:
                    raise BundleError(where, f"archive holds {name!r} twice", BundleCode.INVALID)
                if not member.isreg() or member.issparse():
                    raise BundleError(
                        where, f"archive member {name!r} is not a plain file", BundleCode.INVALID
                    )
                if member.size != entry.size_bytes:
                    raise BundleError(
                        where,
                        f"archive member {name!r} declares {member.size} bytes, the manifest lists "
                        f"{entry.size_bytes}",
                        "truncated" if member.size < entry.size_bytes else "invalid",
                    )
                data = tar.extractfile(member)
                if data is None:
                    raise BundleError(where, f"cannot read {name!r} from the archive", BundleCode.INVALID)
                _copy_capped(data, out_dir / name, entry, where)
                seen.add(name)
            missing = sorted(set(listed) - seen)
            if missing:
                raise BundleError(
                    where, f"listed files missing from the archive: {missing}", BundleCode.INVALID
                )
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(where, f"archive is damaged or truncated: {exc}", BundleCode.TRUNCATED) from exc
    _atomic_write(out_dir / MANIFEST_FILE, raw)
    return Bundle(path=out_dir, manifest=manifest, raw=raw)
