"""pipeline.media.segment: chunks tile the audio, stay short, cut in silence, land on the batching grid."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.media.audio import SAMPLE_RATE, decode_audio
from pipeline.media.segment import AudioSpan, SpeechSegmenter

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def segmenter() -> SpeechSegmenter:
    return SpeechSegmenter()  # max_chunk_s=30, grid_s=0.5, min_silence_s=0.3


@pytest.fixture(scope="module")
def meeting() -> np.ndarray:
    path = SAMPLES / "long" / "meeting.flac"
    return decode_audio(path.read_bytes(), str(path))


@pytest.fixture(scope="module")
def truth() -> list[dict]:
    return json.loads((SAMPLES / "long" / "meeting.segments.json").read_text())["segments"]


def assert_tiles(chunks: list[AudioSpan], audio: np.ndarray, seg: SpeechSegmenter) -> list[int]:
    """The invariants the pipeline relies on; returns the cut positions in samples."""
    assert chunks[0].start_s == 0.0
    assert chunks[-1].end_s == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-9)
    assert sum(len(c.audio) for c in chunks) == len(audio)
    position = 0
    for chunk in chunks:
        assert round(chunk.start_s * SAMPLE_RATE) == position  # contiguous: no gap, no overlap
        assert round(chunk.end_s * SAMPLE_RATE) == position + len(chunk.audio)
        assert len(chunk.audio) <= seg.max_chunk_s * SAMPLE_RATE
        assert np.shares_memory(chunk.audio, audio)  # a view, not a copy
        np.testing.assert_array_equal(chunk.audio[:5], audio[position : position + 5])
        position += len(chunk.audio)
    grid = round(seg.grid_s * SAMPLE_RATE)
    assert all(len(c.audio) % grid == 0 for c in chunks[:-1]), [len(c.audio) / grid for c in chunks]
    return [round(c.end_s * SAMPLE_RATE) for c in chunks[:-1]]


def test_short_audio_is_one_chunk(segmenter, meeting):
    clip = meeting[: 12 * SAMPLE_RATE]
    [chunk] = segmenter.split(clip)
    assert (chunk.start_s, chunk.end_s) == (0.0, 12.0) and len(chunk.audio) == len(clip)


@pytest.mark.parametrize("max_chunk_s", [30.0, 12.0])
def test_meeting_is_cut_only_in_silence_on_the_grid(meeting, truth, max_chunk_s, segmenter):
    seg = segmenter if max_chunk_s == 30.0 else SpeechSegmenter(max_chunk_s=max_chunk_s)
    chunks = seg.split(meeting)
    cuts = assert_tiles(chunks, meeting, seg)
    assert len(chunks) >= len(meeting) / SAMPLE_RATE / max_chunk_s
    speech = seg.speech_timestamps(meeting)
    for cut in cuts:
        t = cut / SAMPLE_RATE
        assert not any(a < t < b for a, b in speech), f"cut at {t:.2f}s is inside VAD speech"
        spoken = [s["text"] for s in truth if s["start_s"] < t < s["end_s"]]
        assert not spoken, f"cut at {t:.2f}s splits the sentence {spoken[0]!r}"
    # Prefers late cuts (long chunks, fewer prompts): on average most of the window is used.
    assert np.mean([c.duration_s for c in chunks[:-1]]) >= 0.6 * max_chunk_s


def test_vad_finds_the_spoken_sentences(segmenter, meeting, truth):
    speech = segmenter.speech_timestamps(meeting)
    assert speech == sorted(speech) and all(a < b for a, b in speech)
    for sentence in truth:  # every true sentence is (mostly) covered by detected speech
        covered = sum(max(0.0, min(b, sentence["end_s"]) - max(a, sentence["start_s"])) for a, b in speech)
        assert covered >= 0.8 * (sentence["end_s"] - sentence["start_s"]), sentence["text"]
    detected = sum(b - a for a, b in speech)
    spoken = sum(s["end_s"] - s["start_s"] for s in truth)
    assert spoken * 0.9 <= detected <= spoken * 1.15


def test_has_speech(segmenter, meeting):
    assert segmenter.has_speech(meeting[: 10 * SAMPLE_RATE])
    assert not segmenter.has_speech(np.zeros(5 * SAMPLE_RATE, dtype=np.float32))
    hiss = np.random.default_rng(1).normal(0, 1e-3, 5 * SAMPLE_RATE).astype(np.float32)
    assert not segmenter.has_speech(hiss)


def test_hard_cuts_on_the_grid_when_there_is_no_silence(segmenter, monkeypatch):
    audio = np.random.default_rng(2).normal(0, 0.1, int(70.3 * SAMPLE_RATE)).astype(np.float32)
    monkeypatch.setattr(segmenter, "_speech_samples", lambda a: [(0, len(a))])  # all speech, no pause
    chunks = segmenter.split(audio)
    assert_tiles(chunks, audio, segmenter)
    assert [c.duration_s for c in chunks[:-1]] == [30.0, 30.0]
    assert chunks[-1].duration_s == pytest.approx(10.3)


def test_an_hour_splits_fast_with_bounded_memory(segmenter, meeting):
    from pipeline.core.heap import release_free_heap

    hour = np.tile(meeting, int(np.ceil(3600 * SAMPLE_RATE / len(meeting))))
    # from a heap without free pages: what earlier tests freed would otherwise hide the split's own growth
    # or not, depending on which stage last handed it back (pipeline/core/heap.py)
    release_free_heap()
    rss_before = _rss_mb()
    peak_reset = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    chunks = segmenter.split(hour)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    minutes = len(hour) / SAMPLE_RATE / 60
    # CPU time is the budget (a few seconds here); wall time gets slack for a machine shared with others.
    assert cpu < 30, f"{minutes:.0f} min of audio took {cpu:.1f}s of CPU"
    assert elapsed < 90, f"{minutes:.0f} min of audio took {elapsed:.1f}s"
    assert_tiles(chunks, hour, segmenter)
    if peak_reset:  # the VAD works block by block: far below one extra copy of the hour (230 MB)
        growth = _peak_rss_mb() - rss_before
        print(f"an hour split in {elapsed:.1f} s ({cpu:.1f} s of CPU), peak memory +{growth:.0f} MB")
        assert growth < 160, f"peak memory grew by {growth:.0f} MB"


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark so the test measures this split only (Linux; False elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
