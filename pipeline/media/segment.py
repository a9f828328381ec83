"""Long audio -> spans (chunks) the speech encoder can take, cut in silences, preferring a length grid.

Why this shape:
- The model takes at most ~30-40 s of audio per prompt, so long recordings are cut; cutting inside a
  word costs words, so cuts go in silences found by silero-vad.
- Cuts land on multiples of `grid_s` from the chunk start whenever the chosen silence holds such a
  point, so chunk lengths take few distinct values. The GPU side batches clips of any length exactly
  (actors/audio_padding.py masks the audio encoder's padding) by length bucket
  (pipeline/model/inputs.py: audio_bucket); the grid only keeps the lengths tidy.
- Chunks tile the audio exactly (no sample lost or duplicated) and are views into it, so timestamps
  stitch back without arithmetic and an hour of audio is never copied per chunk.
- The VAD runs once over the whole signal, in a batch of rows (each row a stretch of the recording
  with a short warm-up of the stretch before it), because silero's per-32-ms Python loop would take
  about a minute per hour of audio; batched it takes a few seconds.
"""
from __future__ import annotations

import threading
import warnings
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from pipeline.media.audio import SAMPLE_RATE

__all__ = ["AudioSpan", "SpeechSegmenter"]

_FRAME = 512  # silero-vad's window at 16 kHz (32 ms)


@dataclass(frozen=True)
class AudioSpan:
    """One piece of a recording: [start_s, end_s) in seconds and its 16 kHz samples (a view, no copy).

    Equality and hashing use the times only (arrays don't compare to a bool).
    """

    start_s: float
    end_s: float
    audio: np.ndarray = field(repr=False, compare=False)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class _VadParams:
    """silero-vad's own defaults for turning frame probabilities into speech segments."""

    threshold: float = 0.5  # enter speech at or above
    neg_threshold: float = 0.35  # leave speech below (hysteresis)
    min_speech_s: float = 0.25  # shorter speech is dropped as a click
    min_silence_s: float = 0.1  # shorter pauses stay inside speech
    pad_s: float = 0.03  # speech padded each side


class SpeechSegmenter:
    """Finds speech with silero-vad and splits long audio into grid-aligned chunks cut in silence.

    One instance holds one JIT model with recurrent state: use one per process or thread (e.g. build it
    in a Ray actor's `__init__` or once per `map_batches` callable), not one shared across threads.
    """

    def __init__(self, max_chunk_s: float = 30.0, grid_s: float = 0.5, min_silence_s: float = 0.3) -> None:
        if max_chunk_s <= 0:
            raise ValueError(f"max_chunk_s must be positive, not {max_chunk_s}")
        if not 0 < grid_s <= max_chunk_s:
            raise ValueError(f"grid_s must be in (0, max_chunk_s], not {grid_s}")
        if min_silence_s < 0:
            raise ValueError(f"min_silence_s must be >= 0, not {min_silence_s}")
        self.max_chunk_s = float(max_chunk_s)
        self.grid_s = float(grid_s)
        self.min_silence_s = float(min_silence_s)
        self._max_len = int(round(max_chunk_s * SAMPLE_RATE))
        self._grid = int(round(grid_s * SAMPLE_RATE))
        self._min_sil = int(round(min_silence_s * SAMPLE_RATE))
        self._vad = _VadParams()
        self._model = _load_model()
        self._lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------------------

    def speech_timestamps(self, audio: np.ndarray) -> list[tuple[float, float]]:
        """Speech segments as (start_s, end_s), sorted and disjoint, for 16 kHz mono audio."""
        return [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in self._speech_samples(audio)]

    def has_speech(self, audio: np.ndarray) -> bool:
        """True when the VAD finds any speech (music-on-hold or line noise alone gives False)."""
        return bool(self._speech_samples(audio))

    def split(self, audio: np.ndarray) -> list[AudioSpan]:
        """Cut `audio` (16 kHz mono) into chunks of at most max_chunk_s that tile it exactly.

        Each cut goes in a silence of at least min_silence_s, preferring the last third of the window
        (long chunks), then silences that hold a grid point (chunk length a multiple of grid_s), then the
        longest. Inside the chosen silence the cut is the grid point nearest its middle, or the middle
        itself when no grid point falls inside. With no usable silence the cut is hard, on the grid, at
        most max_chunk_s in. The last chunk is whatever remains.
        """
        audio = _as_mono(audio)
        n = len(audio)
        if n <= self._max_len:
            return [AudioSpan(0.0, n / SAMPLE_RATE, audio)]
        silences = self._silences(self._speech_samples(audio), n)
        bounds = self._cut_points(silences, n)
        return [AudioSpan(a / SAMPLE_RATE, b / SAMPLE_RATE, audio[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    # -- cutting -------------------------------------------------------------------------------------------

    def _cut_points(self, silences: list[tuple[int, int]], n: int) -> list[int]:
        """Sample positions 0 = b0 < b1 < ... < bk = n with every b(i+1) - b(i) <= max_len."""
        starts = [s for s, _ in silences]
        bounds = [0]
        start = 0
        while n - start > self._max_len:
            cut = self._choose_cut(silences, starts, start)
            if cut is None:
                cut = self._hard_cut(start, n)
            bounds.append(cut)
            start = cut
        bounds.append(n)
        return bounds

    def _choose_cut(self, silences: list[tuple[int, int]], starts: list[int], start: int) -> int | None:
        hi = start + self._max_len
        third = self._max_len / 3.0
        zones = [(start + 2 * third, hi, 2), (start + third, start + 2 * third, 1), (start, start + third, 0)]
        best_key: tuple[int, bool, int] | None = None
        best: tuple[int, int, bool] | None = None
        # Silences that can intersect (start, hi]: those ending after `start`, beginning before `hi`.
        first = max(bisect_left(starts, start) - 1, 0)
        for s, e in silences[first:]:
            if s >= hi:
                break
            for z_lo, z_hi, rank in zones:
                a, b = max(s, int(np.ceil(z_lo)), start + 1), min(e, int(z_hi), hi)
                if b <= a:
                    continue
                on_grid = self._grid_point(start, a, b) is not None
                key = (rank, on_grid, b - a)
                if best_key is None or key > best_key:
                    best_key, best = key, (a, b, on_grid)
        if best is None:
            return None
        a, b, on_grid = best
        middle = (a + b) // 2
        if on_grid:
            return self._grid_point(start, a, b, near=middle)
        return max(middle, start + 1)

    def _grid_point(self, start: int, a: int, b: int, near: int | None = None) -> int | None:
        """The point start + k*grid (k >= 1) in [a, b] nearest `near` (any if near is None), or None."""
        g = self._grid
        k_lo = max(-(-(a - start) // g), 1)  # ceil
        k_hi = (b - start) // g
        if k_hi < k_lo:
            return None
        if near is None:
            return start + k_lo * g
        k = min(max(int(round((near - start) / g)), k_lo), k_hi)
        return start + k * g

    def _hard_cut(self, start: int, n: int) -> int:
        """No silence to cut in: cut on the grid, as late as allowed, leaving at least a second behind
        when possible so the last chunk is not a sliver of a few samples."""
        g = self._grid
        room = min(self._max_len, n - start - SAMPLE_RATE)
        k = room // g
        if k < 1:
            k = self._max_len // g
        return start + max(k, 1) * g

    def _silences(self, speech: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
        """Gaps between speech segments (also before the first and after the last) long enough to cut in."""
        gaps, prev = [], 0
        for a, b in speech:
            if a - prev >= max(self._min_sil, 1):
                gaps.append((prev, a))
            prev = max(prev, b)
        if n - prev >= max(self._min_sil, 1):
            gaps.append((prev, n))
        return gaps

    # -- VAD -------------------------------------------------------------------------------------------

    def _speech_samples(self, audio: np.ndarray) -> list[tuple[int, int]]:
        audio = _as_mono(audio)
        if len(audio) == 0:
            return []
        probs = self._frame_probs(audio)
        return _probs_to_segments(probs, len(audio), self._vad)

    def _frame_probs(
        self, audio: np.ndarray, rows: int = 64, row_frames: int = 512, warm_frames: int = 32
    ) -> np.ndarray:
        """Speech probability per 512-sample frame, computed as a batch of rows.

        Row r holds frames [r*R, (r+1)*R) preceded by `warm_frames` of the audio before them (discarded
        outputs), so the recurrent state has settled where the kept frames start. Rows are processed
        `rows` at a time: memory stays at one block (~70 MB), not a copy of the recording. The warm-up
        (1 s) keeps the rows' probabilities close to one sequential pass; speech segments come out the same.
        """
        import torch

        n_frames = -(-len(audio) // _FRAME)
        row_frames = min(row_frames, n_frames)
        n_rows = -(-n_frames // row_frames)
        width = (warm_frames + row_frames) * _FRAME
        out = np.empty(n_rows * row_frames, dtype=np.float32)
        with self._lock, _torch_threads(1), torch.inference_mode():
            for r0 in range(0, n_rows, rows):
                r1 = min(r0 + rows, n_rows)
                block = np.zeros((r1 - r0, width), dtype=np.float32)
                for i, r in enumerate(range(r0, r1)):
                    lo = (r * row_frames - warm_frames) * _FRAME
                    hi = (r + 1) * row_frames * _FRAME
                    piece = audio[max(lo, 0) : hi]
                    offset = max(-lo, 0)
                    block[i, offset : offset + len(piece)] = piece
                probs = self._model.audio_forward(torch.from_numpy(block), SAMPLE_RATE)
                kept = probs[:, warm_frames:].numpy().reshape(-1)
                out[r0 * row_frames : r0 * row_frames + kept.size] = kept
        return out[:n_frames]


def _probs_to_segments(probs: np.ndarray, n: int, p: _VadParams) -> list[tuple[int, int]]:
    """silero-vad's hysteresis rule (as in get_speech_timestamps), on frame probabilities, in samples."""
    min_speech = p.min_speech_s * SAMPLE_RATE
    min_silence = p.min_silence_s * SAMPLE_RATE
    pad = int(p.pad_s * SAMPLE_RATE)
    segments: list[tuple[int, int]] = []
    triggered, seg_start, temp_end = False, 0, -1
    above = probs >= p.threshold
    decisive = np.flatnonzero(above | (probs < p.neg_threshold))  # frames between thresholds change nothing
    for i, is_speech in zip(decisive.tolist(), above[decisive].tolist()):
        cur = i * _FRAME
        if is_speech:
            temp_end = -1
            if not triggered:
                triggered, seg_start = True, cur
        elif triggered:
            if temp_end < 0:
                temp_end = cur
            if cur - temp_end >= min_silence:
                if temp_end - seg_start > min_speech:
                    segments.append((seg_start, temp_end))
                triggered, temp_end = False, -1
    if triggered and n - seg_start > min_speech:
        segments.append((seg_start, n))
    padded: list[tuple[int, int]] = []
    for a, b in segments:
        a, b = max(a - pad, 0), min(b + pad, n)
        if padded and a <= padded[-1][1]:
            padded[-1] = (padded[-1][0], b)
        else:
            padded.append((a, b))
    return padded


def _as_mono(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"expected 1-D 16 kHz mono audio, got shape {audio.shape}")
    if audio.dtype != np.float32:
        audio = audio.astype(np.float32)
    return audio


def _load_model():  # -> torch.jit.ScriptModule
    """Load silero-vad's JIT model from the package data (no download), keeping torch's thread count.

    silero_vad calls torch.set_num_threads(1) at import; that would silently slow every other torch
    user in the process, so the previous setting is put back and the VAD runs single-threaded
    under `_torch_threads` instead.
    """
    import torch

    previous = torch.get_num_threads()
    try:
        import silero_vad

        with warnings.catch_warnings():  # torch.jit / importlib deprecation notices: not actionable here
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model = silero_vad.load_silero_vad()
    finally:
        torch.set_num_threads(previous)
    model.eval()
    return model


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    if previous != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if previous != n:
            torch.set_num_threads(previous)
