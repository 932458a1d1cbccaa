"""Fine-tuning the layer-dropped MiniLM student on the training split (issue 11's optional
``finetune`` extra: a CPU torch, ``pip install 'slmops[finetune]'``; never needed otherwise).

The student is the first ``layers`` of all-MiniLM-L6-v2 with a linear head. In torch it is the
very computation ``encoder.build_encoder`` writes as ONNX (word + position + token-type
embeddings and LayerNorm; per layer masked multi-head attention and an exact-erf GELU FFN, each
with residual + LayerNorm; mean pooling over the mask, L2 normalisation), on the same HF-named
tensors in the same layout, so the trained tensors go straight back into the graph writer: no
``torch.onnx`` export. Only the last ``train_layers`` layers and the head learn; everything
below is frozen. The head starts from the numpy logistic fit on the frozen embeddings and is
only scaffolding: the factory fits its final head again on the (quantized) encoder it ships.

Texts are batched by token length (little padding), in an order shuffled per epoch by ``seed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from slmops.cloud.factory.encoder import MASK_VALUE, MINILM_L6, BertConfig
from slmops.cloud.factory.errors import FactoryInputError
from slmops.shared.preprocess import TokenizerFeaturizer

__all__ = ["FineTuned", "FinetuneUnavailable", "finetune_student"]

#: The torch this extra is measured and pinned with (pyproject ``finetune``).
TORCH_PIN = "torch==2.13.0"


class FinetuneUnavailable(FactoryInputError):
    """The optional ``finetune`` extra (a CPU torch) is not installed."""

    what = "finetune"


@dataclass(frozen=True, slots=True)
class FineTuned:
    """The student's tensors after training (HF names, torch layout, float32; the untouched
    ones are the input arrays), the mean training loss per epoch, the steps run and seconds."""

    tensors: dict[str, npt.NDArray[np.generic]]
    losses: list[float]
    steps: int
    seconds: float


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise FinetuneUnavailable(
            "torch",
            f"fine-tuning needs the optional finetune extra (a CPU {TORCH_PIN}): "
            "pip install 'slmops[finetune]'",
        ) from exc
    return torch


def student_forward(
    torch: Any, p: Mapping[str, Any], feeds: Mapping[str, Any], layers: int, cfg: BertConfig = MINILM_L6
) -> Any:
    """Embeddings [N, hidden] of one padded batch (``feeds``: torch int64 [N, T] by graph input
    name), computed as ``build_encoder`` does with ``p`` (torch tensors by HF name)."""
    f = torch.nn.functional
    ids, mask, types = feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    n, t = ids.shape
    eps = cfg.layer_norm_eps

    def ln(x: Any, name: str) -> Any:
        return f.layer_norm(x, (cfg.hidden,), p[f"{name}.weight"], p[f"{name}.bias"], eps)

    def lin(x: Any, name: str) -> Any:
        return f.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])

    x = p["embeddings.word_embeddings.weight"][ids] + p["embeddings.position_embeddings.weight"][:t]
    x = ln(x + p["embeddings.token_type_embeddings.weight"][types], "embeddings.LayerNorm")
    maskf = mask.to(x.dtype)
    bias = ((1.0 - maskf) * MASK_VALUE)[:, None, None, :]
    heads, d = cfg.heads, cfg.head_dim
    for i in range(layers):
        a = f"encoder.layer.{i}.attention"

        def split(y: Any) -> Any:
            return y.view(n, t, heads, d).transpose(1, 2)

        q, k, v = (split(lin(x, f"{a}.self.{kind}")) for kind in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d)) + bias, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(n, t, cfg.hidden)
        x = ln(lin(ctx, f"{a}.output.dense") + x, f"{a}.output.LayerNorm")
        h = lin(x, f"encoder.layer.{i}.intermediate.dense")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = ln(lin(h, f"encoder.layer.{i}.output.dense") + x, f"encoder.layer.{i}.output.LayerNorm")
    summed = (x * maskf[:, :, None]).sum(dim=1)
    mean = summed / maskf.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def finetune_student(
    tensors: Mapping[str, npt.NDArray[np.generic]],
    tokenizer: TokenizerFeaturizer,
    texts: Sequence[str],
    labels: Sequence[int],
    head: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    *,
    layers: int = 3,
    train_layers: int = 1,
    epochs: int = 2,
    batch: int = 32,
    lr: float = 5e-5,
    head_lr: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    threads: int | None = None,
) -> FineTuned:
    """Fine-tune the last ``train_layers`` of the first ``layers`` (and the head, from
    ``head`` = (W [hidden, C], b [C])) on ``texts``/``labels`` (class indices) with AdamW,
    cross-entropy, ``epochs`` passes (at most ``max_steps`` batches). ``threads``: torch's
    intra-op threads (None: torch's default). Raises ``FinetuneUnavailable`` without torch
    and ``ValueError`` for a bad layer count or mismatched texts/labels."""
    torch = _torch()
    if not 1 <= train_layers <= layers <= MINILM_L6.layers:
        raise ValueError(
            f"need 1 <= train_layers <= layers <= {MINILM_L6.layers}, got {train_layers}, {layers}"
        )
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"texts and labels must be equally long and not empty ({len(texts)}, {len(labels)})")
    t0 = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    trained = {f"encoder.layer.{i}." for i in range(layers - train_layers, layers)}
    params: dict[str, Any] = {}
    for name, array in tensors.items():
        learn = any(name.startswith(prefix) for prefix in trained)
        params[name] = torch.tensor(np.array(array, dtype=np.float32), requires_grad=learn)
    w = torch.tensor(np.array(head[0], dtype=np.float32), requires_grad=True)
    b = torch.tensor(np.array(head[1], dtype=np.float32), requires_grad=True)
    learning = [v for v in params.values() if v.requires_grad]
    optimizer = torch.optim.AdamW([{"params": learning, "lr": lr}, {"params": [w, b], "lr": head_lr}])
    rows = tokenizer.encode(texts)
    by_length = sorted(range(len(texts)), key=lambda i: (rows.lengths[i], i))
    batches = [by_length[s : s + batch] for s in range(0, len(by_length), batch)]
    target = torch.tensor(np.asarray(labels, dtype=np.int64))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        total, seen = 0.0, 0
        for k in rng.permutation(len(batches)):
            if max_steps is not None and steps >= max_steps:
                break
            index = batches[int(k)]
            feeds = {name: torch.from_numpy(a) for name, a in tokenizer.feeds(rows, index).items()}
            emb = student_forward(torch, params, feeds, layers)
            loss = torch.nn.functional.cross_entropy(emb @ w + b, target[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
            steps += 1
        if seen:
            losses.append(total / seen)
    out = dict(tensors)
    for name, value in params.items():
        if value.requires_grad:
            out[name] = value.detach().numpy().astype(np.float32)
    return FineTuned(tensors=out, losses=losses, steps=steps, seconds=time.perf_counter() - t0)
