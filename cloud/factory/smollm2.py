"""SmolLM2-135M-Instruct as ONNX Runtime GenAI folders: conversion from the pinned GGUF, the
embedding variants, greedy smoke tokens and memory, measured.

Conversion needs the optional extra ``smollm2-convert`` (torch 2.13.0 CPU, mobius-onnx 0.1.0,
gguf, onnxruntime-genai); nothing here is imported by a node. Steps, as measured on the
development machine (2 cores, load ~2): mobius-onnx's ``build_from_gguf`` with the GGUF's
4-bit projections kept as ``MatMulNBits`` (16 s wall), its tokenizer rebuilt from the GGUF's
metadata, its ``genai_config.json``; then what mobius-onnx 0.1.0 leaves out and ONNX Runtime
GenAI 0.18 needs, written from the GGUF's metadata: the bos/eos/pad token ids and
``tokenizer_config.json`` (with the chat template), without which the tokenizer does not load.

Variants (``VARIANTS``) differ in the tied embedding, which mobius keeps in float32 (113 MB,
plus a transposed copy ONNX Runtime folds for the head): ``int8-embed`` stores it once as int8
blocks (exactly the GGUF's ``Q8_0`` values), ``int4-embed`` as 4-bit blocks
(``tiedquant.py``); projections are the GGUF's 4-bit blocks in both.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from slmops.cloud.factory.rss import MB_HELPER, MemoryFigures, measure_rss
from slmops.shared.errors import SlmopsError

__all__ = [
    "EXTRA",
    "SMOKE_K",
    "SMOKE_PROMPTS",
    "VARIANTS",
    "MissingExtra",
    "convert",
    "make_variant",
    "measure_memory",
    "require_extra",
]

#: The optional dependency group of ``pyproject.toml`` that conversion needs.
EXTRA = "smollm2-convert"
_MODULES = ("torch", "mobius", "gguf", "onnxruntime_genai")
#: Variant -> bits of the tied embedding.
VARIANTS = {"int8-embed": 8, "int4-embed": 4}
#: Greedy smoke tests compare only the first K tokens: int4 kernels (MatMulNBits) accumulate in
#: a CPU-dependent order, so later tokens may diverge on another CPU after a near-tie.
SMOKE_K = 8
SMOKE_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
)
_TABLE = "model.embed_tokens.weight"
#: Files of the converted folder a variant copies unchanged.
CONFIG_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json")


class MissingExtra(SlmopsError):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, missing: str, what: str) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"{what} needs the optional extra {extra!r} (module {missing!r} is missing): "
            f"pip install 'slmops[{extra}]'"
        )


def require_extra(what: str = "models build --arch smollm2") -> None:
    """Raise ``MissingExtra`` naming ``smollm2-convert`` when one of its modules is absent."""
    for module in _MODULES:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(EXTRA, module, what)


def _gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    tokens = field("tokenizer.ggml.tokens")
    ids = {k: int(field(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown", "padding")}
    return {
        "ids": ids,
        "tokens": {k: str(tokens[v]) for k, v in ids.items()},
        "chat_template": str(field("tokenizer.chat_template")),
        "context_length": int(field("llama.context_length")),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token")),
    }


def _complete_configs(gguf_path: Path, folder: Path, *, max_length: int) -> None:
    """What mobius-onnx 0.1.0 leaves out of an ORT GenAI folder built from a GGUF."""
    meta = _gguf_metadata(gguf_path)
    ids, tokens = meta["ids"], meta["tokens"]
    tokenizer_config = {
        "add_bos_token": meta["add_bos"],
        "add_eos_token": False,
        "bos_token": tokens["bos"],
        "eos_token": tokens["eos"],
        "unk_token": tokens["unknown"],
        "pad_token": tokens["padding"],
        "chat_template": meta["chat_template"],
        "model_max_length": meta["context_length"],
        "tokenizer_class": "GPT2Tokenizer",
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"].update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"])
    # One intra-op thread, as the node's other sessions: the figures in the README are for it.
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    config["search"].update(do_sample=False, max_length=max_length, top_k=1)
    path.write_text(json.dumps(config, indent=1))


def convert(gguf_path: Path, out: Path, *, max_length: int = 2048) -> None:
    """Convert the GGUF into the ORT GenAI folder ``out`` (created): ``model.onnx`` +
    ``model.onnx.data`` (float32 embedding), ``genai_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``. ``max_length`` bounds prompt + output tokens (the KV cache).

    Raises ``MissingExtra`` without the conversion extra."""
    require_extra()
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # mobius draws progress bars per tensor
    import torch
    from mobius.integrations.gguf import build_from_gguf, write_gguf_tokenizer_json
    from mobius.integrations.ort_genai.auto_export import write_ort_genai_config

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    pkg = build_from_gguf(str(gguf_path), keep_quantized=True, execution_provider="cpu")
    pkg.save(str(out), external_data="onnx")
    write_gguf_tokenizer_json(str(gguf_path), str(out))
    write_ort_genai_config(pkg, str(out), ep="cpu")
    _complete_configs(gguf_path, out, max_length=max_length)


def make_variant(converted: Path, out: Path, bits: int) -> None:
    """``converted`` with its tied embedding block-quantized to ``bits`` (4 or 8) into ``out``."""
    import onnx

    from slmops.cloud.factory.tiedquant import quantize_tied_embedding

    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(converted / "model.onnx"))
    quantize_tied_embedding(model, table=_TABLE, bits=bits)
    onnx.save(
        model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
        size_threshold=1024,
    )  # fmt: skip
    for name in CONFIG_FILES:
        shutil.copyfile(converted / name, out / name)


_MEMORY_SCRIPT = (
    MB_HELPER
    + """
import onnxruntime_genai as og

def answer(model, tokenizer, text, n):
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()

model = og.Model(sys.argv[1])
tokenizer = og.Tokenizer(model)
answer(model, tokenizer, "Hello!", 16)
load = mb("VmRSS")
answer(model, tokenizer, " ".join(["word"] * int(sys.argv[2])), 64)
print(json.dumps({"load_mb": round(load, 1), "peak_mb": round(mb("VmHWM"), 1)}))
"""
)


def measure_memory(folder: Path, *, prompt_tokens: int = 512, timeout: float = 300.0) -> MemoryFigures:
    """Resident memory of a fresh process (onnxruntime-genai only, as a node loads it)
    answering a short prompt (``load_mb``, VmRSS), then a ``prompt_tokens``-token prompt with
    64 new tokens (``peak_mb``, VmHWM). Raises ``RuntimeError`` with the child's last stderr
    line."""
    return measure_rss([folder], timeout=timeout, script=_MEMORY_SCRIPT, args=[str(prompt_tokens)])[0]
