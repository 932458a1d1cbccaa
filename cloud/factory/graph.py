"""The ONNX graph of the default classifier: mean of hashed n-gram embeddings, a linear
layer, softmax. Built with ``onnx.helper``; the factory trains the weights, recalibration
shifts the bias."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OPSET", "build_classifier"]

OPSET = 17


def build_classifier(
    embedding: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    *,
    max_tokens: int,
    name: str = "slmops-classifier",
) -> bytes:
    """Serialized ONNX model: inputs ``ids`` int64 [N,T], ``weights`` float32 [N,T]; outputs
    ``logits`` and ``probs`` float32 [N,C]."""
    n_classes = weight.shape[1]
    inits = [
        numpy_helper.from_array(embedding.astype(np.float32), "embedding"),
        numpy_helper.from_array(weight.astype(np.float32), "W"),
        numpy_helper.from_array(bias.astype(np.float32), "b"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "token_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"]),  # [N,T,D]
        helper.make_node("Unsqueeze", ["weights", "last_axis"], ["w3"]),  # [N,T,1]
        helper.make_node("Mul", ["emb", "w3"], ["wemb"]),
        helper.make_node("ReduceSum", ["wemb", "token_axis"], ["pooled"], keepdims=0),  # [N,D]
        helper.make_node("MatMul", ["pooled", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", max_tokens]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["N", max_tokens]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_classes]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
