"""Block quantization of a decoder's tied token embedding (the ``int4``/``int8`` embedding
variants of a generation bundle).

SmolLM2 ties its input embedding and output head: one ``[vocab, hidden]`` table (49,152 × 576)
that the converted graph keeps in float32 (113 MB) and reads twice — a ``Gather`` for the
input and ``Transpose`` + ``MatMul`` for the logits, which ONNX Runtime constant-folds into a
second, transposed 113 MB copy at session creation. This pass replaces the table with one
block-quantized copy read by two ONNX Runtime contrib ops over the same bytes:

- ``com.microsoft.GatherBlockQuantized`` (the embedding: rows ``[vocab, hidden·bits/8]``),
- ``com.microsoft.MatMulNBits`` (the head: the same bytes reshaped to
  ``[vocab, hidden/block, block·bits/8]``), with the same scales and zero points.

Quantization is per block of ``block`` values along the hidden axis, dequantized as
``(q - zero_point) · scale``. 8 bits are symmetric (zero point 128, ``scale = max|x| / 127``):
on a table that came from GGUF ``Q8_0`` (int8 blocks of 32, ``scale = max|x| / 127``) this
reproduces the GGUF values exactly. 4 bits are asymmetric (``scale = (max - min) / 15``), like
GGUF ``Q4_1``. Nibbles are packed low first, the layout both ops read (and MatMulNBits'
4-bit zero points: two blocks per byte, the even block in the low nibble).

Only numpy and ``onnx`` are needed, so a node-side test can check the two ops against
:func:`dequantize` on a real ONNX Runtime session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

__all__ = ["QuantizedTable", "dequantize", "quantize_blocks", "quantize_tied_embedding"]

_MS = "com.microsoft"


@dataclass(frozen=True, slots=True)
class QuantizedTable:
    """A ``[rows, cols]`` float table quantized in blocks along ``cols``.

    ``packed``: uint8 ``[rows, cols·bits/8]``; ``scales``: float32 ``[rows, cols/block]``;
    ``zero_points``: uint8 ``[rows, ceil(blocks·bits/8)]`` (packed like ``packed``)."""

    packed: npt.NDArray[np.uint8]
    scales: npt.NDArray[np.float32]
    zero_points: npt.NDArray[np.uint8]
    bits: int
    block: int


def _pack4(q: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Pairs along the last axis into bytes, the even element in the low nibble (odd length:
    padded with 0)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(p: npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.uint8]:
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out[..., :n]


def quantize_blocks(table: npt.NDArray[np.floating], *, bits: int, block: int = 32) -> QuantizedTable:
    """Quantize ``table`` ``[rows, cols]`` in blocks of ``block`` along ``cols``.

    Raises ``ValueError`` for bits other than 4 or 8, a block that is not a power of two
    ≥ 16, or ``cols`` not a multiple of ``block``."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits!r}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, not {block!r}")
    rows, cols = table.shape
    if cols % block:
        raise ValueError(f"{cols} columns are not a multiple of the block {block}")
    x = np.asarray(table, np.float32).reshape(rows, cols // block, block)
    if bits == 8:
        amax = np.abs(x).max(axis=2)
        scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        zp = np.full(scales.shape, 128, np.uint8)
    else:
        lo = np.minimum(x.min(axis=2), 0.0)
        hi = np.maximum(x.max(axis=2), 0.0)
        scales = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
        zp = np.clip(np.round(-lo / scales), 0, 15).astype(np.uint8)
    top = (1 << bits) - 1
    q = np.clip(np.round(x / scales[..., None]) + zp[..., None], 0, top).astype(np.uint8)
    q = q.reshape(rows, cols)
    if bits == 4:
        return QuantizedTable(_pack4(q), scales, _pack4(zp), bits, block)
    return QuantizedTable(q, scales, zp, bits, block)


def dequantize(t: QuantizedTable) -> npt.NDArray[np.float32]:
    """The float32 ``[rows, cols]`` table ``t`` stands for: ``(q - zero_point) · scale``."""
    rows, nb = t.scales.shape
    cols = nb * t.block
    if t.bits == 4:
        q, zp = _unpack4(t.packed, cols), _unpack4(t.zero_points, nb)
    else:
        q, zp = t.packed, t.zero_points
    x = (q.reshape(rows, nb, t.block).astype(np.float32) - zp[..., None].astype(np.float32)) * t.scales[
        ..., None
    ]
    return x.reshape(rows, cols)


def _table(graph: onnx.GraphProto, name: str) -> npt.NDArray[np.float32]:
    for init in graph.initializer:
        if init.name == name:
            return np.asarray(numpy_helper.to_array(init), np.float32)
    raise ValueError(f"the graph has no initializer {name!r}")


def quantize_tied_embedding(
    model: onnx.ModelProto, *, table: str, bits: int, block: int = 32, accuracy_level: int = 4
) -> onnx.ModelProto:
    """Rewrite ``model`` (external data loaded) in place so the tied table ``table`` is stored
    once, block-quantized, and read by GatherBlockQuantized and MatMulNBits; return it.

    The graph must read ``table`` exactly through one ``Gather`` (the embedding) and one
    ``Transpose`` feeding one ``MatMul`` (the head), as mobius-onnx 0.1.0 writes a tied llama
    head. Raises ``ValueError`` naming what is missing otherwise. ``accuracy_level`` 4 lets
    MatMulNBits compute in int8 on CPU, as the converter's own projections do."""
    g = model.graph
    weights = _table(g, table)
    vocab, hidden = weights.shape
    readers = [n for n in g.node if table in n.input]
    gathers = [n for n in readers if n.op_type == "Gather" and n.input[0] == table]
    transposes = [n for n in readers if n.op_type == "Transpose"]
    if len(gathers) != 1 or len(transposes) != 1 or len(readers) != 2:
        raise ValueError(
            f"{table!r} must be read by one Gather and one Transpose, not by {[n.op_type for n in readers]}"
        )
    heads = [n for n in g.node if n.op_type == "MatMul" and n.input[1] == transposes[0].output[0]]
    if len(heads) != 1:
        raise ValueError(f"the transposed {table!r} must feed one MatMul, found {len(heads)}")
    gather, transpose, head = gathers[0], transposes[0], heads[0]
    q = quantize_blocks(weights, bits=bits, block=block)
    names = {k: f"{table}.q{bits}.{k}" for k in ("packed", "scales", "zero_points", "shape", "matmul")}
    new_inits = [
        numpy_helper.from_array(q.packed, names["packed"]),
        numpy_helper.from_array(q.scales, names["scales"]),
        numpy_helper.from_array(q.zero_points, names["zero_points"]),
        numpy_helper.from_array(
            np.array([vocab, hidden // block, block * bits // 8], np.int64), names["shape"]
        ),
    ]
    blocks: dict[str, Any] = {"domain": _MS, "bits": bits, "block_size": block}
    embed = helper.make_node(
        "GatherBlockQuantized",
        [names["packed"], gather.input[1], names["scales"], names["zero_points"]],
        list(gather.output),
        name=f"{table}.q{bits}.gather",
        gather_axis=0,
        quantize_axis=1,
        **blocks,
    )
    reshape = helper.make_node(
        "Reshape", [names["packed"], names["shape"]], [names["matmul"]], name=f"{table}.q{bits}.view"
    )
    logits = helper.make_node(
        "MatMulNBits",
        [head.input[0], names["matmul"], names["scales"], names["zero_points"]],
        list(head.output),
        name=f"{table}.q{bits}.head",
        K=hidden,
        N=vocab,
        accuracy_level=accuracy_level,
        **blocks,
    )
    nodes = list(g.node)
    replaced = {id(gather): [embed], id(head): [reshape, logits], id(transpose): []}
    kept = [m for n in nodes for m in replaced.get(id(n), [n])]
    del g.node[:]
    g.node.extend(kept)
    inits = [i for i in g.initializer if i.name != table]
    del g.initializer[:]
    g.initializer.extend(inits + new_inits)
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return model
