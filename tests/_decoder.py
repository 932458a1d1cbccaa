"""A tiny generative decoder in the ONNX Runtime GenAI format, built here (no downloads).

The folder it writes is what ``onnxruntime-genai`` loads: ``model.onnx`` (a one-layer decoder
with a real key/value cache: inputs ``input_ids`` [B,S], ``attention_mask`` [B,T],
``past_key_values.0.key/value`` [B,H,P,hd]; outputs ``logits`` [B,S,V], ``present.0.key/value``
[B,H,T,hd]), ``genai_config.json``, and a byte-level BPE ``tokenizer.json`` +
``tokenizer_config.json`` (with a ChatML chat template) trained with the ``tokenizers`` library.

The logits are a bigram language model of the English chatterbot corpus (log P(next | token),
add-one smoothed) plus a small attention term over the whole cache, so the prompt
log-likelihood really is higher on English chat than on other topics or languages, greedy
outputs end with ``<|im_end|>`` (EOS) or at the length limit depending on the prompt, and a
wrong cache would change the outputs. ``seed`` changes the attention weights only (a "second
variant" with the same behaviour, not the same bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slmops.cloud.factory.corpus import default_corpus_dir, load_topics
from slmops.shared.bundle import Bundle
from slmops.shared.generation import GenerationSession

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 400
HEADS = 2
HEAD_SIZE = 8
DIM = HEADS * HEAD_SIZE
CONTEXT = 1024
OPSET = 17
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def english_utterances() -> list[str]:
    """Every English chatterbot utterance, sorted (deterministic)."""
    topics = load_topics(default_corpus_dir(), min_utterances=1)
    return sorted({t for texts in topics.values() for t in texts})


def utterances(language: str) -> list[str]:
    """Every chatterbot utterance of ``language`` (a folder of chatterbot_corpus/data), sorted."""
    topics = load_topics(default_corpus_dir().parent / language, min_utterances=1)
    return sorted({t for texts in topics.values() for t in texts})


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bigram_logprobs(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """log P(next | token) [V,V] from chat-formatted texts (each utterance as an assistant turn)."""
    v = tok.get_vocab_size()
    counts = np.ones((v, v), dtype=np.float64)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    for text in texts:
        ids = [start, *tok.encode("assistant\n" + text).ids, end]
        np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    # Make <|im_end|> 4x more likely wherever it was seen: short, finished answers.
    counts[:, end] *= 4.0
    return np.log(counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def decoder_graph(logp: np.ndarray, *, seed: int) -> bytes:
    """The decoder ONNX model (opset 17, no external data)."""
    v = logp.shape[0]
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 1.0, (v, DIM)).astype(np.float32)
    wq, wk, wv = (rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32) for _ in range(3))
    wo = rng.normal(0, 0.25, (DIM, v)).astype(np.float32)
    i64 = np.int64
    inits = [
        _init("bigram", logp),
        _init("emb", emb),
        _init("Wq", wq),
        _init("Wk", wk),
        _init("Wv", wv),
        _init("Wo", wo),
        _init("split_shape", np.array([0, 0, HEADS, HEAD_SIZE], dtype=i64)),
        _init("merge_shape", np.array([0, 0, DIM], dtype=i64)),
        _init("scale", np.array(1.0 / np.sqrt(HEAD_SIZE), dtype=np.float32)),
        _init("neg", np.array(-1e9, dtype=np.float32)),
        _init("zero", np.array(0, dtype=i64)),
        _init("one", np.array(1, dtype=i64)),
        _init("ax0", np.array([0], dtype=i64)),
        _init("ax01", np.array([0, 1], dtype=i64)),
        _init("ax12", np.array([1, 2], dtype=i64)),
        _init("i1", np.array([1], dtype=i64)),
        _init("i2", np.array([2], dtype=i64)),
        _init("i3", np.array([3], dtype=i64)),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["bigram", "input_ids"], ["big"]),  # [B,S,V]
        n("Gather", ["emb", "input_ids"], ["x"]),  # [B,S,D]
        n("MatMul", ["x", "Wq"], ["q0"]),
        n("MatMul", ["x", "Wk"], ["k0"]),
        n("MatMul", ["x", "Wv"], ["v0"]),
        n("Reshape", ["q0", "split_shape"], ["q1"]),
        n("Reshape", ["k0", "split_shape"], ["k1"]),
        n("Reshape", ["v0", "split_shape"], ["v1"]),
        n("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),  # [B,H,S,hd]
        n("Transpose", ["k1"], ["k"], perm=[0, 2, 1, 3]),
        n("Transpose", ["v1"], ["vv"], perm=[0, 2, 1, 3]),
        n("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),  # [B,H,T,hd]
        n("Concat", ["past_key_values.0.value", "vv"], ["present.0.value"], axis=2),
        n("Transpose", ["present.0.key"], ["kt"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q", "kt"], ["s0"]),  # [B,H,S,T]
        n("Mul", ["s0", "scale"], ["s1"]),
        # Causal mask with a cache: query i (absolute past+i) sees keys j <= past+i.
        n("Shape", ["present.0.key"], ["pshape"]),
        n("Slice", ["pshape", "i2", "i3"], ["total1"]),
        n("Squeeze", ["total1", "ax0"], ["total"]),
        n("Shape", ["input_ids"], ["ishape"]),
        n("Slice", ["ishape", "i1", "i2"], ["seq1"]),
        n("Squeeze", ["seq1", "ax0"], ["seq"]),
        n("Sub", ["total", "seq"], ["past"]),
        n("Range", ["past", "total", "one"], ["qpos"]),
        n("Range", ["zero", "total", "one"], ["kpos"]),
        n("Unsqueeze", ["qpos", "i1"], ["qcol"]),  # [S,1]
        n("Unsqueeze", ["kpos", "ax0"], ["krow"]),  # [1,T]
        n("LessOrEqual", ["krow", "qcol"], ["causal"]),  # [S,T]
        n("Cast", ["attention_mask"], ["amb"], to=TensorProto.BOOL),  # [B,T]
        n("Unsqueeze", ["amb", "ax12"], ["am4"]),  # [B,1,1,T]
        n("And", ["causal", "am4"], ["allowed"]),  # [B,1,S,T]
        n("Where", ["allowed", "s1", "neg"], ["s2"]),
        n("Softmax", ["s2"], ["p"], axis=-1),
        n("MatMul", ["p", "present.0.value"], ["c0"]),  # [B,H,S,hd]
        n("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["c1", "merge_shape"], ["c"]),  # [B,S,D]
        n("MatMul", ["c", "Wo"], ["att"]),  # [B,S,V]
        n("Add", ["big", "att"], ["logits"]),
    ]
    kv = ["batch", HEADS, "past", HEAD_SIZE]
    kv_out = ["batch", HEADS, "total", HEAD_SIZE]
    graph = helper.make_graph(
        nodes,
        "slmops-tiny-decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv),
            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", v]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, kv_out),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, kv_out),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def genai_config(tok: Tokenizer, *, max_length: int = 256) -> dict[str, object]:
    eos = tok.token_to_id("<|im_end|>")
    pad = tok.token_to_id("<|endoftext|>")
    return {
        "model": {
            "bos_token_id": pad,
            "context_length": CONTEXT,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "intra_op_num_threads": 1,
                    "provider_options": [],
                },
                "filename": "model.onnx",
                "head_size": HEAD_SIZE,
                "hidden_size": DIM,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": HEADS,
                "num_hidden_layers": 1,
                "num_key_value_heads": HEADS,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": tok.get_vocab_size(),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def tokenizer_config() -> dict[str, object]:
    return {
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": CONTEXT,
        "tokenizer_class": "GPT2Tokenizer",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_decoder(folder: Path, *, seed: int = 0) -> Path:
    """Write the ORT GenAI folder (model.onnx, genai_config.json, tokenizer files) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = english_utterances()
    tok = train_tokenizer(texts)
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (folder / "model.onnx").write_bytes(decoder_graph(bigram_logprobs(tok, texts), seed=seed))
    (folder / "genai_config.json").write_text(json.dumps(genai_config(tok), indent=2))
    return folder


#: The declared refusal categories of the test bundles (the bigram model says "I am not ..."
#: and "I do not ..." often: English chat in the corpus does).
REFUSALS = {"not_able": ["i am not", "i'm not"], "dont": ["i do not", "i don't"]}


def held_out_prompts(n: int = 40) -> list[str]:
    """Every 7th English utterance (deterministic), ``n`` of them."""
    return english_utterances()[::7][:n]


def make_generation_bundle_for_tests(
    folder: Path, out: Path, key: Ed25519PrivateKey, *, name: str = "chat", version: int = 1, **kw: Any
) -> Bundle:
    """A signed generation bundle of ``folder`` (the tiny decoder) with the test defaults."""
    from slmops.cloud.factory.genai import make_generation_bundle

    kw.setdefault("max_new_tokens", 24)
    report = make_generation_bundle(
        folder, prompts=held_out_prompts(), name=name, version=version, key=key, out_dir=out,
        refusals=REFUSALS, smoke_k=4, **kw,
    )  # fmt: skip
    return report.bundle


def bundle_and_session(folder: Path, out: Path, key: Ed25519PrivateKey) -> tuple[Bundle, GenerationSession]:
    """``make_generation_bundle_for_tests`` and a GenAI session of the written bundle."""
    bundle = make_generation_bundle_for_tests(folder, out, key)
    return bundle, GenerationSession(bundle.path, bundle.manifest)


def quality_cases_for(bundle: Bundle, prompts: list[str], max_new_tokens: int = 12) -> list[Any]:
    """Quality cases the bundle's model passes: its own greedy answer to each prompt, the
    first as an exact match, the others by containment of the answer's first word
    upper-cased (containment is case-insensitive)."""
    from slmops.shared.messages import GenerationQualityCase

    session = GenerationSession(bundle.path, bundle.manifest)
    cases = []
    for i, prompt in enumerate(prompts):
        text = session.answer(prompt, max_new_tokens)
        assert text.strip(), f"the tiny decoder answered {prompt!r} with nothing"
        if i == 0:
            cases.append(
                GenerationQualityCase(
                    prompt=prompt, expect=text, match="exact", max_new_tokens=max_new_tokens
                )
            )
        else:
            word = text.split()[0].upper()
            cases.append(GenerationQualityCase(prompt=prompt, expect=word, max_new_tokens=max_new_tokens))
    return cases


def with_quality(bundle: Bundle, out: Path, key: Ed25519PrivateKey, cases: list[Any]) -> Bundle:
    """A copy of ``bundle`` in ``out`` whose manifest holds the quality set ``cases``, re-signed."""
    import msgspec

    from slmops.shared.bundle import FileData, write_bundle

    m = bundle.manifest
    assert m.generation is not None
    manifest = msgspec.structs.replace(
        m, generation=msgspec.structs.replace(m.generation, quality=list(cases))
    )
    items = [FileData(f.path, (bundle.path / f.path).read_bytes(), f.role) for f in m.files]
    return write_bundle(out, items, manifest, key)
