"""``slmops models import``: bring your own ONNX model and tokenizer (``cloud.factory.importer``
does the work; this parses)."""

from __future__ import annotations

from pathlib import Path

import click

from slmops.cli_common import out_dir_option, signing_key_option

__all__ = ["import_cmd"]

_file = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.command(name="import")
@click.option(
    "--onnx", "onnx_path", default=None, type=_file, help="The ONNX model (inputs named as the tokenizer's)."
)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    default=None,
    type=_file,
    help="Its HF tokenizers file (tokenizer.json).",
)
@click.option("--genai", "genai_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="An ONNX Runtime GenAI folder (decoder, genai_config.json, tokenizer): a generation "
              'model (instead of --onnx/--tokenizer; --data holds {"prompt": ...} lines).')  # fmt: skip
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Generation models: the most new tokens per answer.")  # fmt: skip
@click.option("--labels", default=None, help="Comma-separated class labels, in the model's output order.")
@click.option(
    "--task",
    type=click.Choice(["classification", "embedding"]),
    default=None,
    help="embedding: the output is a pooled [batch, dim] vector (no --labels). Default: classification "
    "(generation with --genai).",
)
@click.option(
    "--data", "data_path", required=True, type=_file, help='Held-out JSON lines {"text": ..., "label": ...}.'
)
@click.option("--name", required=True, help="Model name.")
@click.option("--version", required=True, type=click.IntRange(min=1), help="Model version.")
@signing_key_option
@out_dir_option(
    "Bundle directory to write (must be empty or absent). Default: ./<name>-v<version>.", required=False
)
@click.option("--output", default="", help="Model output to read. Default: its first output.")
@click.option(
    "--max-tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Truncation length in tokens.",
)
@click.option("--min-memory-mb", default=0, type=click.IntRange(min=0), help="Device memory the model needs.")
def import_cmd(
    onnx_path: Path | None,
    tokenizer_path: Path | None,
    genai_dir: Path | None,
    max_new_tokens: int,
    labels: str | None,
    task: str | None,
    data_path: Path,
    name: str,
    version: int,
    key_path: Path,
    out_dir: Path | None,
    output: str,
    max_tokens: int,
    min_memory_mb: int,
) -> None:
    """Check an ONNX model against its tokenizer and held-out data, and write a signed bundle.

    Refuses, with one line naming the model input/output, the file and the data line, a model
    whose inputs the tokenizer does not produce, an output whose width is not the number of
    labels, a tokenizer whose vocabulary does not fit the model, a bad data line, or a model
    that gives non-finite values. Measures the reference profile and smoke tests on --data.
    """
    from slmops.cloud.factory.importer import ImportRefused, import_model
    from slmops.shared.bundle import load_private_key

    if genai_dir is not None:
        if onnx_path is not None or tokenizer_path is not None or labels is not None:
            raise click.UsageError("--genai takes the whole folder: no --onnx, --tokenizer or --labels")
        _import_genai(genai_dir, data_path, name, version, key_path, out_dir, max_new_tokens, min_memory_mb)
        return
    if onnx_path is None or tokenizer_path is None:
        raise click.UsageError("give --onnx and --tokenizer (or --genai DIR for a generation model)")

    label_list = [x.strip() for x in labels.split(",")] if labels is not None else None
    try:
        key = load_private_key(key_path)
        report = import_model(
            onnx_path=onnx_path,
            tokenizer_path=tokenizer_path,
            data_path=data_path,
            name=name,
            version=version,
            key=key,
            out_dir=out_dir or Path(f"{name}-v{version}"),
            labels=label_list,
            task=task or "classification",
            output=output,
            max_tokens=max_tokens,
            min_memory_mb=min_memory_mb,
        )
    except (ImportRefused, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    m = report.bundle.manifest
    click.echo(f"bundle       {report.bundle.path}  ({m.name} v{m.version}, task {m.task})")
    click.echo(f"inputs       {', '.join(sorted(report.inputs))}")
    click.echo(f"output       {report.output} ({report.output_kind})")
    click.echo(f"files        {', '.join(f'{f.path} ({f.size_bytes} B)' for f in m.files)}")
    if report.accuracy is not None:
        click.echo(f"held-out     {report.held_out} texts, accuracy {report.accuracy:.4f}")
    else:
        click.echo(f"held-out     {report.held_out} texts")


def _import_genai(
    folder: Path,
    data_path: Path,
    name: str,
    version: int,
    key_path: Path,
    out_dir: Path | None,
    max_new_tokens: int,
    min_memory_mb: int,
) -> None:
    from slmops.cloud.factory.genai import GenerationImportRefused, make_generation_bundle, read_prompts
    from slmops.shared.bundle import load_private_key
    from slmops.shared.errors import BundleError

    try:
        report = make_generation_bundle(
            folder,
            prompts=read_prompts(data_path),
            name=name,
            version=version,
            key=load_private_key(key_path),
            out_dir=out_dir or Path(f"{name}-v{version}"),
            max_new_tokens=max_new_tokens,
            min_memory_mb=min_memory_mb,
        )
    except (GenerationImportRefused, BundleError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    m = report.bundle.manifest
    click.echo(f"bundle       {report.bundle.path}  ({m.name} v{m.version}, task {m.task})")
    click.echo(f"files        {', '.join(f'{f.path} ({f.size_bytes} B, {f.role})' for f in m.files)}")
    click.echo(
        f"held-out     {report.prompts} prompts; smoke tests: first {report.smoke[0].k} greedy tokens "
        f"of {len(report.smoke)} prompts ({report.seconds:.1f} s)"
    )
