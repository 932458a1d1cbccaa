"""Issue 13 fault 2: hypothesis against every wire decoder and the whole cloud ingest path
(decode → checks → state → detectors on a real SQLite file), deep nesting and extreme
integers included; 0 escapes. A few hundred examples per property here; `slmops bench fuzz`
runs 10,000 each (``slmops.bench.fuzz`` holds both properties)."""

from __future__ import annotations

from slmops.bench.fuzz import fuzz_decoders, fuzz_ingest

EXAMPLES = 300


def test_no_decoder_lets_anything_but_a_decode_error_out() -> None:
    r = fuzz_decoders(EXAMPLES, seed=13)
    assert r.examples >= EXAMPLES
    assert r.escapes == 0, r.first_escape


def test_the_whole_ingest_path_applies_or_deadletters_every_message() -> None:
    r = fuzz_ingest(EXAMPLES, seed=13)
    assert r.examples >= EXAMPLES
    assert r.escapes == 0, r.first_escape
    assert r.applied > 0  # the generator reaches state and detectors, not only the checks
    assert r.deadlettered > 0
