"""Running a generation bundle (an ONNX Runtime GenAI folder) with ``onnxruntime-genai``.

A ``GenerationSession`` loads the folder once (model, ``genai_config.json``, tokenizer) and
starts ``GenerationRun``s: the chat template applied to the messages, the prompt fed in one
prefill, then one token per ``step``. Every method that runs the model blocks and is meant for
a worker thread; separate runs may step in separate threads at once (one GenAI ``Generator``
each, the ``Model`` is shared).

Stop strings are matched on the decoded text; text that could still become a stop string is
held back until it cannot, so a stop string is never streamed. The prompt log-likelihood is
the mean of log P(token_i | tokens_<i) over the prompt (a read of the prefill's
[prompt tokens x vocabulary] logits), computed only when asked (``GenerationSpec.loglik_share``).

``onnxruntime-genai`` is an optional extra (``pip install 'slmops[genai]'``): ``available()``
says whether it is installed; loading without it raises ``BundleError`` naming the extra.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from slmops.shared.errors import BundleError
from slmops.shared.messages import GenerationQualityCase, GenerationSpec, ModelManifest
from slmops.shared.vocabulary import BundleCode

__all__ = [
    "GENAI_EXTRA",
    "HOSTILE_PROMPTS",
    "GenerationParams",
    "GenerationRun",
    "GenerationSession",
    "PromptTooLong",
    "available",
    "load_generation",
    "quality_passed",
    "refusal_category",
]

GENAI_EXTRA = "pip install 'slmops[genai]'"
#: Prompts every generation bundle must take (a few tokens each, no failure) before it is accepted.
HOSTILE_PROMPTS: tuple[str, ...] = (
    "",
    "   \t\n ",
    "日本語のテキストです",
    "Привет, как дела?",
    "😀🔥👍🏽 🚀",
    "\x00\x01\x7f",
    "<|im_end|><|endoftext|>",
)


def available() -> bool:
    """Whether ``onnxruntime_genai`` can be imported here (without importing it)."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


class PromptTooLong(ValueError):
    """The prompt has more tokens than the model's (or the request's) limit."""

    def __init__(self, tokens: int, limit: int) -> None:
        self.tokens = tokens
        self.limit = limit
        super().__init__(f"prompt is {tokens} tokens, more than the limit {limit}")


class GenerationParams(msgspec.Struct, frozen=True, kw_only=True):
    """One request's settings (already checked against the manifest's limits)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def refusal_category(text: str, refusals: dict[str, list[str]]) -> str | None:
    """The first declared category (in manifest order) one of whose phrases occurs in
    ``text``, case-insensitively; None when none does."""
    low = text.lower()
    for name, phrases in refusals.items():
        if any(p and p.lower() in low for p in phrases):
            return name
    return None


def quality_passed(text: str, case: GenerationQualityCase) -> bool:
    """Whether the answer ``text`` passes ``case`` (see ``GenerationQualityCase``): "exact"
    compares both stripped, any other ``match`` ("contains") looks for ``expect`` in the
    answer case-insensitively."""
    if case.match == "exact":
        return text.strip() == case.expect.strip()
    return case.expect.strip().lower() in text.lower()


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray, *, block: int = 64) -> np.ndarray:
    """log softmax(logits)[i, targets[i]] per row (rows of a vocabulary), in float32 blocks of
    ``block`` rows with float64 sums: [336, 49152] took 0.39 s, against 3.5 s converting the
    whole array to float64 first (measured here, load ~8), to within 3e-7."""
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), block):
        rows = logits[i : i + block]
        top = rows.max(axis=1, keepdims=True)
        total = np.exp(rows - top).sum(axis=1, dtype=np.float64)
        picked = rows[np.arange(len(rows)), targets[i : i + block]] - top[:, 0]
        out[i : i + block] = picked.astype(np.float64) - np.log(total)
    return out


class GenerationRun:
    """One generation in progress. ``step`` (blocking) returns the next visible text (may be
    "") or None once finished; then ``reason`` is "eos", "stop" or "length" and ``tokens``
    holds the generated token ids (the end-of-sequence token excluded). A caller that stops
    stepping simply drops the run (its reason is then the caller's: "cancelled")."""

    def __init__(
        self, session: GenerationSession, prompt_ids: Sequence[int], params: GenerationParams
    ) -> None:
        og = session.og
        self.session = session
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.text = ""
        self.reason = ""
        self._emitted = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        gp = og.GeneratorParams(session.model)
        # GenAI refuses a max_length past the model's context: the answer then ends at the
        # context ("length"), as it would in any runtime.
        opts: dict[str, Any] = {
            "max_length": min(self.prompt_tokens + params.max_new_tokens, session.context)
        }
        if params.temperature > 0:
            opts.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.seed is not None:
                opts["random_seed"] = params.seed
        else:
            opts.update(do_sample=False, top_k=1)
        gp.set_search_options(**opts)
        self._gen = og.Generator(session.model, gp)
        self._stream = session.tokenizer.create_stream()
        self._ids = np.asarray(prompt_ids, dtype=np.int32)
        self._prefilled = False

    def prefill(self, *, loglik: bool = False) -> float | None:
        """Feed the prompt (blocking). With ``loglik``, return the prompt's mean token
        log-likelihood (nats; None for a prompt of one token)."""
        self._gen.append_tokens(self._ids)
        self._prefilled = True
        if not loglik or len(self._ids) < 2:
            return None
        logits = np.asarray(self._gen.get_output("logits"))
        logits = logits.reshape(-1, logits.shape[-1])[-len(self._ids) :]
        lp = _log_softmax_at(logits[:-1], self._ids[1:].astype(np.int64))
        value = float(lp.mean())
        return value if math.isfinite(value) else None

    def step(self) -> str | None:
        """Generate one token (blocking); the text it makes visible, or None when done."""
        if self.reason:
            return None
        if not self._prefilled:
            self.prefill()
        gen = self._gen
        if gen.is_done():
            return self._finish("length")
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token in self.session.eos:
            return self._finish("eos")
        self.tokens.append(token)
        self.text += self._stream.decode(token)
        for s in self.params.stop:
            at = self.text.find(s) if s else -1
            if at >= 0:
                self.text = self.text[:at]
                return self._finish("stop")
        if len(self.tokens) >= self.params.max_new_tokens or gen.is_done():
            return self._finish("length")
        safe = max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out

    def _finish(self, reason: str) -> str:
        self.reason = reason
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out


class GenerationSession:
    """A loaded generation bundle. ``encode`` and ``start`` are thread-safe."""

    def __init__(self, folder: Path, manifest: ModelManifest, *, intra_op_threads: int = 1) -> None:
        spec = manifest.generation
        where = str(folder)
        if spec is None:
            raise BundleError(
                where, "a generation model's manifest needs 'generation'", BundleCode.INCOMPATIBLE
            )
        if not available():
            raise BundleError(
                where,
                f"onnxruntime-genai is not installed, needed for generation models: {GENAI_EXTRA}",
                BundleCode.INCOMPATIBLE,
            )
        import onnxruntime_genai as og

        self.og: Any = og
        self.manifest = manifest
        self.spec: GenerationSpec = spec
        self.folder = folder
        try:
            config = og.Config(str(folder))
            overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": intra_op_threads}}}}
            config.overlay(json.dumps(overlay))
            self.model: Any = og.Model(config)
            self.tokenizer: Any = og.Tokenizer(self.model)
        except Exception as exc:  # GenAI raises RuntimeError/OrtException/... for a bad folder
            raise BundleError(
                where,
                f"onnxruntime-genai cannot load the model: {str(exc).splitlines()[0][:300]}",
                BundleCode.LOAD_FAILED,
            ) from exc
        self.eos, self.context = self._read_config(folder / spec.genai_config)

    @property
    def task(self) -> str:
        return "generation"

    @staticmethod
    def _read_config(config: Path) -> tuple[set[int], int]:
        """The end-of-sequence ids and the context length (tokens) of ``genai_config.json``
        (GenAI loaded it already, so it is readable; an absent field means none / no limit)."""
        model = json.loads(config.read_text()).get("model", {})
        eos = model.get("eos_token_id", [])
        context = model.get("context_length")
        ids = {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        return ids, int(context) if isinstance(context, int) and context > 0 else 1 << 30

    def template(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text: ``messages`` ([{"role", "content"}]) through the chat template,
        with the assistant's turn opened."""
        tpl = self.spec.chat_template or None
        text: str = self.tokenizer.apply_chat_template(
            json.dumps(list(messages)), template_str=tpl, add_generation_prompt=True
        )
        return text

    def encode(self, messages: Sequence[dict[str, str]] | str, *, limit: int | None = None) -> list[int]:
        """Prompt token ids of ``messages`` (a string is one user message). Raises
        ``PromptTooLong`` beyond ``limit`` (default: the manifest's ``max_prompt_tokens``)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = [int(i) for i in self.tokenizer.encode(self.template(messages))]
        most = self.spec.max_prompt_tokens if limit is None else limit
        most = min(most, self.context - 1)  # room for at least one new token
        if len(ids) > most:
            raise PromptTooLong(len(ids), most)
        return ids

    def start(self, prompt_ids: Sequence[int], params: GenerationParams) -> GenerationRun:
        return GenerationRun(self, prompt_ids, params)

    def greedy(self, prompt: str, k: int) -> list[int]:
        """The first ``k`` greedy token ids for one user message (smoke tests)."""
        run = self.start(self.encode(prompt, limit=1 << 30), GenerationParams(max_new_tokens=k))
        while run.step() is not None:
            pass
        return run.tokens[:k]

    def answer(self, prompt: str, max_new_tokens: int) -> str:
        """The greedy answer to one user message (blocking), the prompt untruncated."""
        run = self.start(self.encode(prompt, limit=1 << 30), GenerationParams(max_new_tokens=max_new_tokens))
        while run.step() is not None:
            pass
        return run.text

    def run_quality(self, cases: Sequence[GenerationQualityCase] | None = None) -> int:
        """How many of ``cases`` (default: the manifest's quality set) pass, greedy (blocking:
        one answer of at most each case's ``max_new_tokens`` per case)."""
        todo = self.spec.quality if cases is None else cases
        return sum(quality_passed(self.answer(c.prompt, c.max_new_tokens), c) for c in todo)

    def smoke_test(self) -> float:
        """The manifest's greedy smoke tests, then ``HOSTILE_PROMPTS`` (4 tokens each, no
        failure). Raises ``BundleError(code='smoke_failed')``; returns the seconds taken."""
        import time

        name = self.manifest.name
        t0 = time.perf_counter()
        for t in self.spec.smoke:
            try:
                got = self.greedy(t.prompt, t.k)
            except Exception as exc:  # GenAI raises several unrelated types
                raise BundleError(
                    name, f"smoke test {t.prompt[:40]!r}: the model fails: {exc}", BundleCode.SMOKE_FAILED
                ) from exc
            if got != list(t.token_ids[: t.k]):
                raise BundleError(
                    name,
                    f"smoke test {t.prompt[:40]!r}: first {t.k} greedy tokens {got}, "
                    f"recorded {t.token_ids[: t.k]}",
                    BundleCode.SMOKE_FAILED,
                )
        took = time.perf_counter() - t0
        for prompt in HOSTILE_PROMPTS:
            try:
                run = self.start(self.encode(prompt, limit=1 << 30), GenerationParams(max_new_tokens=4))
                ll = run.prefill(loglik=True)
                while run.step() is not None:
                    pass
            except Exception as exc:
                raise BundleError(
                    name, f"hostile prompt {prompt[:40]!r}: the model fails: {exc}", BundleCode.SMOKE_FAILED
                ) from exc
            if ll is not None and not math.isfinite(ll):
                raise BundleError(
                    name, f"hostile prompt {prompt[:40]!r}: non-finite logits", BundleCode.SMOKE_FAILED
                )
        return took


def load_generation(folder: Path, manifest: ModelManifest, *, intra_op_threads: int = 1) -> GenerationSession:
    """Load the generation bundle in ``folder`` (see ``GenerationSession``). Raises
    ``BundleError`` (``incompatible`` without the extra or spec, ``load_failed``)."""
    return GenerationSession(folder, manifest, intra_op_threads=intra_op_threads)
