"""bench/vocabulary_scale.py on tiny models: its phases, peak memory and JSON (the numbers mean nothing)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from bench.vocabulary_scale import main  # noqa: E402


@pytest.mark.parametrize("detector", ["owlv2", "grounding-dino"])
def test_vocabulary_scale_reports_phases_and_peak_memory(tmp_path, detector, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vocab = tmp_path / "classes.txt"
    vocab.write_text("".join(f"thing {i},item {i}\n" for i in range(60)))
    out = tmp_path / "scale.json"
    assert main(["--vocabulary", str(vocab), "--detector", detector, "--images", "2", "--batch", "2",
                 "--size", "64x48", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == 60 and result["queries"] == 120
    assert set(result["phases"]) == {"build", "queries", "annotate"}
    assert all(p["peak_rss_mb"] > 0 and p["seconds"] >= 0 for p in result["phases"].values())
    assert result["phases"]["annotate"]["instances"] > 0
    if detector == "grounding-dino":
        assert result["captions"] > 1  # 120 phrases do not fit one 256-token caption
