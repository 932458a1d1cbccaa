"""``slmops bench generate --quick`` on the suite's tiny decoder: every row the README reports is
there, measured (project and baseline both positive), and nothing passes or fails on a time."""

from __future__ import annotations

from pathlib import Path

import pytest
from _decoder import make_generation_bundle_for_tests

from slmops.bench import run_scenario
from slmops.shared.bundle import load_private_key, new_keypair


@pytest.mark.slow
@pytest.mark.timeout(300)  # an edge subprocess plus 2 x 8 answers each way on a loaded 2-core machine
@pytest.mark.anyio
async def test_generate_bench_quick_reports_node_and_bare_figures(tiny_decoder: Path, tmp_path: Path) -> None:
    key_path, _ = new_keypair(tmp_path / "keys")
    bundle = make_generation_bundle_for_tests(tiny_decoder, tmp_path / "bundle", load_private_key(key_path))
    rows = await run_scenario("generate", quick=True, model=bundle.path)
    by_name = {r["scenario"]: r for r in rows}
    assert set(by_name) == {
        "generate python decode",
        "generate python time to first token",
        "generate http stream decode",
        "generate http stream time to first token",
        "generate node rss",
        "generate prompt log-likelihood, chat prompts",
        "generate prompt log-likelihood, a ~300-token prompt",
    }
    for row in rows:
        assert row["project"] > 0, row
        assert row["baseline"] > 0, row
    for case in ("python", "http stream"):
        decode = by_name[f"generate {case} decode"]
        assert decode["units"] == "tokens/s"
        assert decode["answers"] == 8
        assert decode["output_tokens"] > 8  # answers of more than one token: a decode rate exists
    assert by_name["generate node rss"]["units"] == "MB"
    ll = by_name["generate prompt log-likelihood, a ~300-token prompt"]
    assert ll["prompt_tokens"] > 100
    assert ll["loglik_share"] == bundle.manifest.generation.loglik_share  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_generate_bench_without_a_model_says_how_to_make_one() -> None:
    with pytest.raises(
        ValueError, match=r"needs --model DIR, a generation bundle: slmops models build --arch smollm2"
    ):
        await run_scenario("generate", quick=True)
