"""The baseline of ``slmops bench generate``: a bare ``onnxruntime-genai`` loop, what an app
embedding ONNX Runtime GenAI itself would write (chat template, encode, ``append_tokens``,
``generate_next_token`` until end of sequence or the token limit), on one intra-op thread as
the node runs it; and the cost of the prompt's log-likelihood (a read of the prefill's
``[prompt tokens × vocabulary]`` logits and a log-softmax at the prompt's next tokens).

Run as ``python -m slmops.bench._genbare FOLDER`` it loads the folder, answers two prompts and
prints its VmRSS in MB (the bare process the node's RSS is compared with).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BareGenerator", "Timed", "loglik_cost", "rates"]


@dataclass(frozen=True, slots=True)
class Timed:
    """One answer: prompt and output tokens, time to first token and decode rate.

    ``ttft_ms``: from the request (template + encode + prefill included) to the first token;
    ``decode_s``: last token - first token; (output tokens - 1) / ``decode_s`` is the decode
    rate the node's telemetry reports."""

    prompt_tokens: int
    output_tokens: int
    ttft_ms: float
    decode_s: float


def rates(answers: Sequence[Timed]) -> tuple[float, float]:
    """(decode tokens/s over all answers, mean time to first token in ms)."""
    tokens = sum(max(0, a.output_tokens - 1) for a in answers)
    seconds = sum(a.decode_s for a in answers)
    return (tokens / seconds if seconds > 0 else 0.0), float(np.mean([a.ttft_ms for a in answers]))


class BareGenerator:
    """``onnxruntime_genai`` on an ORT GenAI folder, one intra-op thread, greedy."""

    def __init__(self, folder: Path, *, threads: int = 1) -> None:
        import onnxruntime_genai as og

        self.og: Any = og
        config = og.Config(str(folder))
        config.overlay(
            json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})
        )
        self.model: Any = og.Model(config)
        self.tokenizer: Any = og.Tokenizer(self.model)
        genai = json.loads((folder / "genai_config.json").read_text())
        eos = genai["model"].get("eos_token_id", [])
        self.eos = {int(e) for e in (eos if isinstance(eos, list) else [eos])}

    def encode(self, prompt: str) -> np.ndarray:
        messages = json.dumps([{"role": "user", "content": prompt}])
        return np.asarray(
            self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)),
            dtype=np.int32,
        )

    def _generator(self, ids: np.ndarray, max_new_tokens: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, top_k=1, max_length=len(ids) + max_new_tokens)
        return self.og.Generator(self.model, params)

    def answer(self, prompt: str, max_new_tokens: int) -> Timed:
        """Generate greedily to end of sequence or ``max_new_tokens``; decode each token to
        text as a streaming app does."""
        t0 = time.perf_counter()
        ids = self.encode(prompt)
        gen = self._generator(ids, max_new_tokens)
        stream = self.tokenizer.create_stream()
        gen.append_tokens(ids)
        n, first, text = 0, 0.0, ""
        while not gen.is_done() and n < max_new_tokens:
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in self.eos:
                break
            text += stream.decode(token)
            n += 1
            if n == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        first = first or end
        return Timed(len(ids), n, (first - t0) * 1000, end - first)

    def prefill_ms(self, ids: np.ndarray, *, loglik: bool) -> tuple[float, float | None]:
        """Milliseconds to feed ``ids`` (and, with ``loglik``, read the logits and compute the
        mean next-token log-likelihood, which is returned)."""
        gen = self._generator(ids, 1)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        value: float | None = None
        if loglik:
            logits = np.asarray(gen.get_output("logits"))
            logits = logits.reshape(-1, logits.shape[-1])[-len(ids) :][:-1].astype(np.float64)
            top = logits.max(axis=1, keepdims=True)
            norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            value = float((logits[np.arange(len(ids) - 1), ids[1:]] - norm).mean())
        return (time.perf_counter() - t0) * 1000, value


def loglik_cost(bare: BareGenerator, prompts: Sequence[str], repeats: int) -> dict[str, float]:
    """Mean prefill ms without and with the log-likelihood over ``prompts``, interleaved,
    ``repeats`` times each, and the mean prompt tokens."""
    plain: list[float] = []
    with_ll: list[float] = []
    tokens: list[int] = []
    for _ in range(repeats):
        for prompt in prompts:
            ids = bare.encode(prompt)
            tokens.append(len(ids))
            plain.append(bare.prefill_ms(ids, loglik=False)[0])
            with_ll.append(bare.prefill_ms(ids, loglik=True)[0])
    return {
        "prefill_ms": float(np.mean(plain)),
        "prefill_loglik_ms": float(np.mean(with_ll)),
        "prompt_tokens": float(np.mean(tokens)),
    }


def _rss_main(folder: Path) -> None:
    bare = BareGenerator(folder)
    for prompt in ("Hello!", "What is the capital of France?"):
        bare.answer(prompt, 32)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            print(int(line.split()[1]) // 1024)


if __name__ == "__main__":
    _rss_main(Path(sys.argv[1]))
