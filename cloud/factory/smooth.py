"""Activation smoothing before dynamic int8 quantization (SmoothQuant, Xiao et al. 2023).

Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``) quantizes each MatMul's
activation input per tensor at run time, so a few channels with large values (BERT has them)
set the scale for all the others. For each MatMul with a constant weight ``W [in, out]``, the
factor ``s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)`` per input channel ``j`` moves
that range from the activation into the weight: the graph computes ``(X / s) @ (s * W)``,
the same product in exact arithmetic. ``X / s`` is one ``Mul`` by a constant vector, shared by
the MatMuls reading the same ``X`` (Q, K and V); the weights are quantized per channel
afterwards as before, so the file size does not change (a [hidden] vector per group).

``max|X_j|`` is measured by running the fp32 graph (ONNX Runtime, one thread) on calibration
batches; padded positions count, because the run-time quantizer sees them too.

Measured on all-MiniLM-L6-v2 (factory int8, 20 reference sentences in one padded batch, cosine
with sentence-transformers): without smoothing mean 0.9908, min 0.9789 ("hello"); alpha 0.5
mean 0.9854 min 0.9742; **0.7 mean 0.9960 min 0.9917**; 0.8 min 0.9895; 0.9 min 0.9569.
On 256 training texts apart from the calibration ones, against the fp32 encoder: alpha 0 mean
0.9887 min 0.9661; 0.6 mean 0.9940 min 0.9852; 0.7 mean 0.9960 min 0.9865; 0.8 mean 0.9957.
So ``ALPHA = 0.7``. As built by the factory (calibrated on the first 256 training texts):
reference cosine mean 0.9961, min 0.9925; held-out accuracy 0.8063 -> 0.8160 and agreement
with fp32 0.9613 -> 0.9782 (int8); size 23.90 -> 23.97 MB. The alternative of keeping
sensitive MatMuls in fp32 cost size for less: both FFN MatMuls of every layer fp32 gave min
0.9956 at 44.6 MB (vs 23.5 MB); FFN-out and the last layer fp32 min 0.9901 at 37.5 MB;
reduce_range min 0.9789.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

__all__ = ["ALPHA", "smooth_activations"]

#: Migration strength (see the module docstring for how it was chosen).
ALPHA = 0.7
#: Bounds of a factor: a dead channel (max 0) must not make an inf or a 0 weight row.
_FLOOR = 1e-5
_CLIP = (1e-3, 1e3)

Feeds = Mapping[str, npt.NDArray[np.integer]]


def _activation_maxima(
    model: onnx.ModelProto, inputs: list[str], batches: Iterable[Feeds]
) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in inputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feeds in batches:
        for name, value in zip(inputs, session.run(inputs, dict(feeds)), strict=True):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    if not maxima:
        raise ValueError("smoothing needs at least one calibration batch")
    return maxima


def smooth_activations(fp32: bytes, batches: Iterable[Feeds], *, alpha: float = ALPHA) -> bytes:
    """``fp32`` (a serialized float graph) with each constant-weight MatMul's input divided
    and its weight rows multiplied by per-channel factors measured on ``batches`` (the graph's
    feeds, e.g. ``TokenizerFeaturizer.feeds``). The output equals the input graph's to float
    rounding (~1e-7 here). Raises ``ValueError`` without batches or for ``alpha`` outside
    [0, 1]. Deterministic for the same graph, batches and machine."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    model = onnx.load_from_string(fp32)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            groups.setdefault(node.input[0], []).append(node)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    # A weight read elsewhere too cannot be rescaled for one reader: leave its group alone.
    groups = {x: ms for x, ms in groups.items() if all(readers[m.input[1]] == 1 for m in ms)}
    maxima = _activation_maxima(model, list(groups), batches)
    nodes: list[onnx.NodeProto] = []
    done: set[str] = set()
    for node in graph.node:
        x = node.input[0] if node.op_type == "MatMul" else ""
        if x in groups:
            if x not in done:  # first reader: the Mul goes right before it
                done.add(x)
                arrays = [numpy_helper.to_array(weights[m.input[1]]) for m in groups[x]]
                w_max = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
                a_max = maxima[x]
                s = np.maximum(a_max, _FLOOR) ** alpha / np.maximum(w_max, _FLOOR) ** (1.0 - alpha)
                s = np.clip(s, *_CLIP).astype(np.float32)
                inv = numpy_helper.from_array((1.0 / s).astype(np.float32), name=f"{x}/smooth")
                graph.initializer.append(inv)
                nodes.append(helper.make_node("Mul", [x, inv.name], [f"{x}/smoothed"], name=f"{x}/smooth"))
                for m, w in zip(groups[x], arrays, strict=True):
                    t = weights[m.input[1]]
                    t.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name=t.name))
            node.input[0] = f"{x}/smoothed"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return bytes(model.SerializeToString())
