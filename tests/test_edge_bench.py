"""`slmops bench edge|buffer --quick` run end to end and report each figure with its baseline."""

from __future__ import annotations

import pytest

from slmops.bench import REQUIRED_KEYS, run_scenario
from slmops.cloud.factory.cache import CachedModel


def check(results: list[dict[str, object]]) -> None:
    assert results
    for r in results:
        assert all(k in r for k in REQUIRED_KEYS), r
        project, baseline = r["project"], r["baseline"]
        assert isinstance(project, int | float)
        assert isinstance(baseline, int | float)
        assert project > 0
        assert baseline > 0
        assert r["ratio"] == pytest.approx(project / baseline)


@pytest.mark.anyio
async def test_buffer_bench_quick() -> None:
    results = await run_scenario("buffer", quick=True)
    check(results)
    assert {r["rows_per_append"] for r in results} == {1, 32}


@pytest.mark.anyio
async def test_edge_bench_quick_covers_python_http_and_rss() -> None:
    results = await run_scenario("edge", quick=True)
    check(results)
    names = [str(r["scenario"]) for r in results]
    assert any(n.startswith("edge python b1") for n in names)
    assert any(n.startswith("edge python b32") for n in names)
    assert any(n.startswith("edge http b1") for n in names)
    assert any(n.startswith("edge http b32") for n in names)
    assert names[-2:] == ["edge node rss idle", "edge node rss peak b32x64"]
    http = [r for r in results if str(r["scenario"]).startswith("edge http")]
    assert all(r["bare_http"] > 0 for r in http)  # type: ignore[operator]


@pytest.mark.anyio
async def test_edge_bench_quick_on_the_minilm_default(minilm_default: CachedModel) -> None:
    """``--model PATH``: a multi-file tokenizer bundle, measured against the bare tokenizer +
    encoder/head ``session.run`` and a bare aiohttp endpoint."""
    results = await run_scenario("edge", quick=True, model=minilm_default.bundles["int8-l3"])
    check(results)
    assert all("int8-l3" in str(r["model"]) for r in results)
    rows = {str(r["scenario"]): r for r in results}
    assert rows["edge python b1 c1"]["max_tokens"] == 64
    assert "overhead_us_per_call" in rows["edge http b1 c1"]
    assert "bare_http_overhead_us_per_call" in rows["edge http b1 c1"]
    assert rows["edge node rss peak b32x64"]["project"] >= rows["edge node rss idle"]["project"]
