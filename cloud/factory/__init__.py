"""The model factory (cloud-only): corpus, pretrained weights, the MiniLM encoder graph and head
(the default model and its variants), the n-gram model, reference profile, quantized variants."""
