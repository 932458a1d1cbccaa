"""The bare-library baselines of ``slmops bench edge``: what an app would write itself with
ONNX Runtime and the tokenizer, no slmops in the loop.

``BarePredictor``: for a ``tokenizer`` bundle, ``tokenizers.Tokenizer`` in batch mode
(truncation at the manifest's ``max_tokens``, padding to the longest in the batch) +
``InferenceSession.run`` of the encoder (+ the head when the bundle has one) + argmax; for a
``hashed_ngrams`` bundle, ``featurize`` + ``run`` + argmax. One intra-op thread, like a node.

Run as a script (``python -m slmops.bench._bare BUNDLE PORT``) it serves the same predictor as
a bare aiohttp endpoint, ``POST /v1/predict {"texts": [...]}`` → ``{"labels": [...]}``, calling
``session.run`` in the handler: the framework's own per-call cost, shown apart from ours.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["BarePredictor"]


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class BarePredictor:
    def __init__(self, bundle_dir: Path) -> None:
        from slmops.shared.bundle import read_bundle

        bundle = read_bundle(bundle_dir)
        m = bundle.manifest
        self.manifest = m
        self.session = _session(bundle.model_path)
        head = bundle.file("head")
        self.head = _session(head) if head is not None else None
        self.head_input = self.head.get_inputs()[0].name if self.head is not None else ""
        last = self.head or self.session
        self.output = m.output or (
            m.outputs[-1].name if not m.files and m.outputs else last.get_outputs()[0].name
        )
        self.encoder_output = self.session.get_outputs()[0].name
        self.tokenizer = None
        if m.preprocessing.kind == "tokenizer":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(bundle.path / m.preprocessing.tokenizer))
            tok.enable_truncation(max_length=m.preprocessing.max_tokens)
            tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of the batch
            self.tokenizer = tok
            graph_in = {i.name for i in self.session.get_inputs()}
            self.names = dict(m.preprocessing.input_names) or {
                r: r for r in ("input_ids", "attention_mask", "token_type_ids") if r in graph_in
            }

    def _feeds(self, texts: Sequence[str]) -> dict[str, npt.NDArray[np.generic]]:
        if self.tokenizer is None:
            from slmops.shared.preprocess import featurize

            return featurize(texts, self.manifest.preprocessing).feeds()
        encs = self.tokenizer.encode_batch(list(texts))
        arrays = {
            "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
        }
        return {name: arrays[role] for role, name in self.names.items()}

    def predict(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        feeds = self._feeds(texts)
        if self.head is None:
            (out,) = self.session.run([self.output], feeds)
        else:
            (emb,) = self.session.run([self.encoder_output], feeds)
            (out,) = self.head.run([self.output], {self.head_input: emb})
        labels: npt.NDArray[np.int64] = np.asarray(out).argmax(axis=1)
        return labels


def _serve(bundle_dir: Path, port: int) -> None:
    from aiohttp import web

    predictor = BarePredictor(bundle_dir)
    labels = predictor.manifest.labels

    async def predict(request: web.Request) -> web.Response:
        texts = (await request.json())["texts"]
        idx = predictor.predict(texts)
        return web.Response(
            text=json.dumps({"labels": [labels[int(i)] for i in idx]}), content_type="application/json"
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.post("/v1/predict", predict), web.get("/v1/health", health)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
