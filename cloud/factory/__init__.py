"""The model factory: corpus, ONNX graph, reference profile, quantized variants (cloud-only)."""
