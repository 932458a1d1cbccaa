"""A BERT sentence encoder as an ONNX graph, written directly from the pretrained tensors with
numpy and ``onnx.helper`` (no torch, no export step), and the linear head that classifies its
embeddings.

Encoder (what sentence-transformers' all-MiniLM-L6-v2 computes):

- embeddings: word + absolute position + token-type, LayerNorm;
- per layer: multi-head self-attention whose scores get ``-1e9`` where ``attention_mask`` is 0
  (broadcast as [N,1,1,T]: over heads and query positions, masking *keys*), output projection,
  residual + LayerNorm; FFN with the exact erf GELU, residual + LayerNorm (eps from the config,
  1e-12 for this model);
- mean pooling over the positions where ``attention_mask`` is 1, then L2 normalisation
  (``x / max(‖x‖, 1e-12)``, as ``torch.nn.functional.normalize``).

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [N, T] (any T up to the
512 positions); output ``embedding``: float32 [N, hidden]. ``layers`` keeps only the first
layers (a shallower, faster student with the same embedding width).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "INPUT_NAMES",
    "OPSET",
    "BertConfig",
    "build_encoder",
    "build_head",
]

OPSET = 17
#: Graph input name per tokenizer role (``Preprocessing.input_names``).
INPUT_NAMES = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "token_type_ids",
}
#: Added to the attention scores of padded keys: exp() of it is exactly 0 in float32.
MASK_VALUE = -1e9


@dataclass(frozen=True, slots=True)
class BertConfig:
    """The architecture numbers (all-MiniLM-L6-v2's ``config.json``)."""

    hidden: int = 384
    heads: int = 12
    layers: int = 6
    intermediate: int = 1536
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


MINILM_L6 = BertConfig()


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def init(self, name: str, array: npt.NDArray[np.generic]) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self._n}", **attrs))
        return out

    def linear(self, x: str, w: npt.NDArray[np.generic], b: npt.NDArray[np.generic], name: str) -> str:
        """``x @ w.T + b`` with a torch-layout weight [out, in] (stored transposed)."""
        wt = self.init(f"{name}.weight", np.asarray(w, dtype=np.float32).T)
        bias = self.init(f"{name}.bias", np.asarray(b, dtype=np.float32))
        return self.op("Add", [self.op("MatMul", [x, wt]), bias])

    def layer_norm(self, x: str, t: Mapping[str, npt.NDArray[np.generic]], name: str, eps: float) -> str:
        scale = self.init(f"{name}.weight", np.asarray(t[f"{name}.weight"], dtype=np.float32))
        bias = self.init(f"{name}.bias", np.asarray(t[f"{name}.bias"], dtype=np.float32))
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)


def _const(g: _Graph, name: str, values: list[int] | list[float], dtype: type) -> str:
    return g.init(name, np.array(values, dtype=dtype))


def _attention(g: _Graph, x: str, mask_bias: str, t: Mapping[str, npt.NDArray[np.generic]], i: int,
               cfg: BertConfig) -> str:  # fmt: skip
    p = f"encoder.layer.{i}.attention"
    split = f"heads_shape_{i}"
    _const(g, split, [0, 0, cfg.heads, cfg.head_dim], np.int64)

    def project(kind: str) -> str:
        y = g.linear(x, t[f"{p}.self.{kind}.weight"], t[f"{p}.self.{kind}.bias"], f"{p}.self.{kind}")
        return g.op("Reshape", [y, split])  # [N,T,heads,d]

    q = g.op("Transpose", [project("query")], perm=[0, 2, 1, 3])  # [N,h,T,d]
    k = g.op("Transpose", [project("key")], perm=[0, 2, 3, 1])  # [N,h,d,T]
    v = g.op("Transpose", [project("value")], perm=[0, 2, 1, 3])  # [N,h,T,d]
    scale = _const(g, f"attn_scale_{i}", [1.0 / math.sqrt(cfg.head_dim)], np.float32)
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask_bias])  # [N,h,T,T]
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # [N,T,h,d]
    merged = g.op("Reshape", [ctx, _const(g, f"merge_shape_{i}", [0, 0, cfg.hidden], np.int64)])
    out = g.linear(merged, t[f"{p}.output.dense.weight"], t[f"{p}.output.dense.bias"], f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [out, x]), t, f"{p}.output.LayerNorm", cfg.layer_norm_eps)


def _ffn(g: _Graph, x: str, t: Mapping[str, npt.NDArray[np.generic]], i: int, cfg: BertConfig) -> str:
    p = f"encoder.layer.{i}"
    h = g.linear(x, t[f"{p}.intermediate.dense.weight"], t[f"{p}.intermediate.dense.bias"],
                 f"{p}.intermediate.dense")  # fmt: skip
    # Exact GELU: 0.5 * h * (1 + erf(h / sqrt(2))) (BERT's "gelu", not the tanh approximation).
    erf = g.op("Erf", [g.op("Div", [h, _const(g, f"sqrt2_{i}", [math.sqrt(2.0)], np.float32)])])
    one_plus = g.op("Add", [erf, _const(g, f"one_{i}", [1.0], np.float32)])
    gelu = g.op("Mul", [g.op("Mul", [h, one_plus]), _const(g, f"half_{i}", [0.5], np.float32)])
    out = g.linear(gelu, t[f"{p}.output.dense.weight"], t[f"{p}.output.dense.bias"], f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [out, x]), t, f"{p}.output.LayerNorm", cfg.layer_norm_eps)


def build_encoder(
    tensors: Mapping[str, npt.NDArray[np.generic]],
    *,
    config: BertConfig = MINILM_L6,
    layers: int | None = None,
    name: str = "slmops-encoder",
) -> bytes:
    """Serialized ONNX encoder from BERT ``tensors`` (HF names, torch layout), keeping the first
    ``layers`` (default: all ``config.layers``). Raises ``ValueError`` for a layer count out of
    range and ``KeyError`` naming a missing tensor."""
    n_layers = config.layers if layers is None else layers
    if not 1 <= n_layers <= config.layers:
        raise ValueError(f"layers must be in 1..{config.layers}, got {layers!r}")
    g = _Graph()
    ids, mask, types = INPUT_NAMES["input_ids"], INPUT_NAMES["attention_mask"], INPUT_NAMES["token_type_ids"]
    word = g.init("embeddings.word_embeddings.weight", tensors["embeddings.word_embeddings.weight"])
    pos = g.init("embeddings.position_embeddings.weight", tensors["embeddings.position_embeddings.weight"])
    tt = g.init("embeddings.token_type_embeddings.weight", tensors["embeddings.token_type_embeddings.weight"])
    # Position rows 0..T-1 for the batch's own length (padding is to the longest in the batch).
    seq_len = g.op("Gather", [g.op("Shape", [ids]), _const(g, "one_i64", [1], np.int64)], axis=0)
    pos_rows = g.op(
        "Slice", [pos, _const(g, "zero_1", [0], np.int64), seq_len, _const(g, "axis_0", [0], np.int64)]
    )
    x = g.op(
        "Add",
        [g.op("Add", [g.op("Gather", [word, ids]), pos_rows]), g.op("Gather", [tt, types])],
    )
    x = g.layer_norm(x, tensors, "embeddings.LayerNorm", config.layer_norm_eps)
    mask_f = g.op("Cast", [mask], to=TensorProto.FLOAT)  # [N,T]
    # (1 - mask) * -1e9 as [N,1,1,T]: every head and query row ignores padded keys.
    inv = g.op("Sub", [_const(g, "one_f", [1.0], np.float32), mask_f])
    bias2 = g.op("Mul", [inv, _const(g, "mask_value", [MASK_VALUE], np.float32)])
    mask_bias = g.op("Unsqueeze", [bias2, _const(g, "axes_1_2", [1, 2], np.int64)])
    for i in range(n_layers):
        x = _attention(g, x, mask_bias, tensors, i, config)
        x = _ffn(g, x, tensors, i, config)
    # Mean over the unmasked positions, then L2 normalisation.
    m3 = g.op("Unsqueeze", [mask_f, _const(g, "axes_2", [2], np.int64)])  # [N,T,1]
    axis1 = _const(g, "axes_1", [1], np.int64)
    summed = g.op("ReduceSum", [g.op("Mul", [x, m3]), axis1], keepdims=0)  # [N,H]
    count = g.op(
        "Max", [g.op("ReduceSum", [m3, axis1], keepdims=0), _const(g, "min_count", [1e-9], np.float32)]
    )
    mean = g.op("Div", [summed, count])
    norm = g.op("ReduceL2", [mean], axes=[-1], keepdims=1)  # axes an attribute until opset 18
    norm = g.op("Max", [norm, _const(g, "min_norm", [1e-12], np.float32)])
    g.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"], name="embedding"))
    graph = helper.make_graph(
        g.nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "T"]) for n in (ids, mask, types)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", config.hidden])],
        initializer=g.inits,
    )
    return _serialize(graph)


def build_head(
    weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32], *, name: str = "slmops-head"
) -> bytes:
    """Serialized ONNX head: input ``embedding`` float32 [N, D] -> output ``logits`` float32
    [N, C] = embedding @ W + b, with initializers ``W`` [D, C] and ``b`` [C] (the bias a
    label-shift recalibration moves)."""
    dim, n_classes = weight.shape
    if bias.shape != (n_classes,):
        raise ValueError(f"bias has shape {bias.shape}, expected ({n_classes},)")
    inits = [
        numpy_helper.from_array(np.asarray(weight, dtype=np.float32), "W"),
        numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "b"),
    ]
    nodes = [
        helper.make_node("MatMul", ["embedding", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["logits"], name="logits"),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
        initializer=inits,
    )
    return _serialize(graph)


def _serialize(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="slmops")
    model.ir_version = 9
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
