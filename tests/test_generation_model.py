"""Generation models (issue 19): the tiny decoder the suite builds in the ONNX Runtime GenAI
format runs in ``onnxruntime-genai``; its greedy outputs match recorded token ids; a bundle of
it is signed, verified, smoke-tested, refused when its smoke tests or files are wrong; and
``slmops models import --genai`` makes one from the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest
from _decoder import REFUSALS, bundle_and_session, held_out_prompts, make_generation_bundle_for_tests
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from _edge_util import Keys
from slmops.cli import main
from slmops.cloud.factory.genai import GenerationImportRefused, make_generation_bundle
from slmops.shared.bundle import TrustStore, read_bundle, write_bundle
from slmops.shared.capabilities import CAPABILITIES, requirements_of, unmet
from slmops.shared.errors import BundleError
from slmops.shared.generation import GenerationParams, GenerationSession, PromptTooLong
from slmops.shared.messages import GenerationSmoke, ModelManifest
from slmops.shared.runtime import verify_bundle

#: The first K greedy token ids of each prompt (one user message through the chat template),
#: recorded from a run of ``tests/_decoder.py`` (seed 0) with onnxruntime-genai 0.18.0. The
#: decoder is fp32 and tiny, so these ids are exact; K = 6 (int4 models would compare fewer).
K = 6
RECORDED = {
    "hello": [43, 375, 346, 259, 68, 266],
    "what is your favorite sport": [43, 375, 259, 288, 305, 79],
    "tell me about computers": [43, 375, 346, 290, 347, 390],
}


def test_greedy_outputs_of_the_tiny_decoder_match_the_recorded_token_ids(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    _, session = bundle_and_session(tiny_decoder, tmp_path / "b", keys.key)
    for prompt, ids in RECORDED.items():
        assert session.greedy(prompt, K) == ids, prompt
    # The cache is real: the answers differ by prompt, and a run continues where it stopped.
    assert len({tuple(v) for v in RECORDED.values()}) == len(RECORDED)


def test_a_generation_bundle_verifies_and_says_what_it_needs(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    bundle = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "b", keys.key)
    m = bundle.manifest
    assert m.task == "generation"
    assert {f.path: f.role for f in m.files} == {
        "genai_config.json": "genai_config",
        "model.onnx": "model",
        "tokenizer.json": "tokenizer",
        "tokenizer_config.json": "tokenizer",
    }
    req = requirements_of(m)
    assert (req.task, req.preprocessing, req.multi_file) == ("generation", "genai", True)
    assert unmet(req, CAPABILITIES) == []
    assert unmet(req, ["hashed_ngrams", "tokenizer", "classification", "multi_file", "runtime:2"]) == [
        "preprocessing 'genai'",
        "task 'generation'",
    ]
    spec = m.generation
    assert spec is not None
    assert spec.reference is not None
    assert m.reference is not None
    # The reference holds what held-out prompts gave: every prompt counted once everywhere.
    n = len(held_out_prompts())
    assert spec.reference_prompts == m.reference.count == n
    assert sum(spec.reference.stop_reasons.values()) == n
    assert m.reference.confidence.total == spec.reference.loglik_sampled == n
    assert m.reference.input_length.total == spec.reference.output_tokens.total == n
    assert set(spec.reference.refusals) == set(REFUSALS)
    assert [s.k for s in spec.smoke] == [4, 4, 4]
    session = verify_bundle(read_bundle(bundle.path), TrustStore([keys.key.public_key()]))
    assert isinstance(session, GenerationSession)


def test_a_bundle_whose_greedy_tokens_differ_from_its_smoke_test_is_refused(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    good = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "b", keys.key)
    spec = good.manifest.generation
    assert spec is not None
    smoke = spec.smoke[0]
    wrong = GenerationSmoke(prompt=smoke.prompt, k=smoke.k, token_ids=[t + 1 for t in smoke.token_ids])
    manifest = msgspec.structs.replace(good.manifest, generation=msgspec.structs.replace(spec, smoke=[wrong]))
    files = [_file_data(good.path, f.path, f.role) for f in good.manifest.files]
    bad = write_bundle(tmp_path / "bad", files, manifest, keys.key)
    with pytest.raises(BundleError) as err:
        verify_bundle(read_bundle(bad.path), TrustStore([keys.key.public_key()]))
    assert err.value.code == "smoke_failed"
    assert "greedy tokens" in str(err.value)
    assert repr(smoke.prompt[:40]) in str(err.value)


def _file_data(root: Path, path: str, role: str) -> object:
    from slmops.shared.bundle import FileData

    return FileData(path=path, data=root / path, role=role)


def test_stop_strings_are_never_streamed_and_limits_hold(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    _, session = bundle_and_session(tiny_decoder, tmp_path / "b", keys.key)
    ids = session.encode("tell me about computers")
    free = session.start(ids, GenerationParams(max_new_tokens=8))
    pieces = []
    while (p := free.step()) is not None:
        pieces.append(p)
    assert "".join(pieces) == free.text == "I am not in Python?"
    assert free.reason == "length"
    stopped = session.start(ids, GenerationParams(max_new_tokens=8, stop=("Pyth",)))
    pieces = []
    while (p := stopped.step()) is not None:
        pieces.append(p)
    assert "".join(pieces) == stopped.text == "I am not in "
    assert stopped.reason == "stop"
    one = session.start(ids, GenerationParams(max_new_tokens=1))
    while one.step() is not None:
        pass
    assert (len(one.tokens), one.reason) == (1, "length")
    with pytest.raises(PromptTooLong) as err:
        session.encode("word " * 600)
    assert err.value.limit == 512
    assert "more than the limit 512" in str(err.value)


def test_the_prompt_likelihood_is_higher_on_english_chat_than_on_other_languages(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    """The signal the drift test relies on: the decoder's bigram logits are English chat."""
    from _decoder import utterances

    _, session = bundle_and_session(tiny_decoder, tmp_path / "b", keys.key)

    def mean_ll(prompts: list[str]) -> float:
        values = []
        for p in prompts:
            run = session.start(session.encode(p), GenerationParams(max_new_tokens=1))
            ll = run.prefill(loglik=True)
            assert ll is not None
            values.append(ll)
        return sum(values) / len(values)

    english = mean_ll(held_out_prompts(20))
    spanish = mean_ll(utterances("spanish")[:20])
    assert english > spanish + 0.3, (english, spanish)


def test_models_import_genai_makes_a_signed_bundle_and_refuses_a_bad_folder(
    tiny_decoder: Path, tmp_path: Path, keys: Keys
) -> None:
    key_path = tmp_path / "k.key"
    key_path.write_bytes(
        keys.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held_out_prompts(10)))
    out = tmp_path / "imported"
    result = CliRunner().invoke(
        main,
        ["models", "import", "--genai", str(tiny_decoder), "--data", str(prompts), "--name", "chat",
         "--version", "1", "--key", str(key_path), "--out", str(out), "--max-new-tokens", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "task generation" in result.output
    manifest = read_bundle(out).manifest
    assert isinstance(manifest, ModelManifest)
    assert manifest.generation is not None
    assert manifest.generation.max_new_tokens == 16
    verify_bundle(read_bundle(out), TrustStore([keys.key.public_key()]))
    # A folder without its genai_config.json, and a prompt file with a bad line, are refused.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_decoder, broken)
    (broken / "genai_config.json").unlink()
    with pytest.raises(GenerationImportRefused, match=r"genai_config\.json"):
        make_generation_bundle(
            broken, prompts=["hi"], name="chat", version=1, key=keys.key, out_dir=tmp_path / "o2"
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": 3}\n')
    result = CliRunner().invoke(
        main,
        ["models", "import", "--genai", str(tiny_decoder), "--data", str(bad), "--name", "chat",
         "--version", "1", "--key", str(key_path), "--out", str(tmp_path / "o3")],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "bad.jsonl:2" in result.output
