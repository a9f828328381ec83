"""Bytes -> 16 kHz mono float32 audio: soundfile (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...), streamed
in blocks through soxr so an hour of 44.1 kHz stereo never sits in memory at its source rate; stereo
calls optionally kept per channel (`decode_audio_channels`).

Every function takes the raw bytes of one input plus its name (`source`, the uri or id) and either returns
samples or raises `InputError` with a sentence naming that input and the cause, so a bad file becomes an
error row and never a failed job. Nothing here touches the network or the GPU.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from pipeline.core.errors import InputError

SAMPLE_RATE = 16000
"""The model's audio rate: every decoded waveform comes back at this rate."""

SILENCE_PEAK = 1e-4
"""Peak level (full scale = 1.0) under which audio counts as digital silence: about -80 dBFS."""

_BLOCK_FRAMES = 1 << 20  # ~65 s at 16 kHz per read: bounds memory for long files, few Python round trips



def decode_audio(data: bytes, source: str, *, channels: str = "mix", max_s: float | None = None) -> np.ndarray:
    """Decode any soundfile-readable audio to float32 mono at 16 kHz, peak within [-1, 1].

    channels: "mix" averages all channels (what ASR of a whole call wants); "left" / "right" take one
    channel of a stereo recording (a right channel of a mono file is an InputError).
    max_s: the longest recording accepted (None: no limit); see `_read_resampled`.
    Raises InputError for undecodable bytes, empty audio, NaN/inf samples, digital silence, audio over
    `max_s`, and truncated files (fewer frames than the header says).
    """
    if channels == "mix":
        out = _read_resampled(data, source, select=None, max_s=max_s)
    elif channels in ("left", "right"):
        out = _read_resampled(data, source, select=0 if channels == "left" else 1, max_s=max_s)
    else:
        raise ValueError(f"channels must be 'mix', 'left' or 'right', not {channels!r}")
    wave = out[:, 0]
    _check_signal(wave, source)
    return wave


def decode_audio_channels(data: bytes, source: str, *, max_s: float | None = None) -> list[np.ndarray]:
    """Decode to one float32 16 kHz waveform per channel (stereo calls: agent and customer apart).

    Raises InputError when the file is undecodable, empty, over `max_s` or truncated, or when *every*
    channel is silent. A single silent channel (a muted side of a call) is returned as is, since the
    other side is still worth transcribing; callers can test it with `SpeechSegmenter.has_speech`.
    """
    out = _read_resampled(data, source, select=None, mix=False, max_s=max_s)
    waves = [np.ascontiguousarray(out[:, c]) for c in range(out.shape[1])]
    _check_not_empty(waves[0], source)
    if all(_peak(w) < SILENCE_PEAK for w in waves):
        raise InputError.about(source, "silent audio: no signal on any channel")
    return waves


# Formats whose header gives the exact frame count, so that fewer frames read means a cut-off file. MP3
# (mpg123 estimates the count from the bitrate when there is no Xing header) and Ogg are left out.
_EXACT_LENGTH_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC"})
_TRUNCATION_SLACK_S = 0.1  # sloppy writers miscount the data length by a few frames, not by this much
_UNKNOWN_FRAMES = 1 << 62  # libsndfile's "length not known" (SF_COUNT_MAX) and anything near it


def _read_resampled(data: bytes, source: str, *, select: int | None, mix: bool = True,
                    max_s: float | None = None) -> np.ndarray:
    """Read all frames block by block, mix or pick channels, resample to 16 kHz; shape (n, channels).

    Mixing before resampling makes soxr do one channel's work instead of N. The output is written into
    one buffer sized from the header's frame count, so the peak memory is about the size of the 16 kHz
    output (not twice it), whatever the source rate and length.

    max_s: a recording longer than this is refused from its header's frame count before any sample is
    decoded, and, for headers without one (or lying), as soon as the decoded frames pass it.
    Truncation: for formats whose header counts the frames exactly, a file that holds less audio than
    its header says (an upload or a copy cut short) is refused, because its transcript would be that of
    a fragment that looks complete.
    """
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise InputError.about(source, f"cannot decode audio ({_sf_reason(err)})") from err
    with f:
        rate, n_channels = f.samplerate, f.channels
        claimed = f.frames if 0 < f.frames < _UNKNOWN_FRAMES else None
        wav_claimed = _wav_claimed_frames(data)
        if wav_claimed is not None and (claimed is None or wav_claimed > claimed):
            claimed = wav_claimed  # libsndfile clamps a WAV's frame count to the bytes present
        if max_s is not None and claimed is not None and claimed / rate > max_s:
            raise InputError.about(source, f"audio is {_duration(claimed / rate)} long, over the "
                                           f"{_duration(max_s)} limit (audio.max_audio_s); not decoded")
        if select is not None and select >= n_channels:
            plural = "s" if n_channels != 1 else ""
            raise InputError.about(
                source, f"has {n_channels} channel{plural}, so there is no channel {select + 1} to take"
            )
        out_channels = 1 if (select is not None or mix) else n_channels
        stream = None
        if rate != SAMPLE_RATE:
            stream = soxr.ResampleStream(rate, SAMPLE_RATE, out_channels, dtype="float32", quality="HQ")
        expected = f.frames if 0 < f.frames < _UNKNOWN_FRAMES else None
        out = _Samples(out_channels, int(expected * SAMPLE_RATE / rate) + 4096 if expected else 1 << 16)
        max_frames = int(max_s * rate) if max_s is not None else None
        frames_read = 0
        peak = 0.0
        while True:
            try:
                block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            except (sf.SoundFileError, RuntimeError) as err:
                if claimed is not None and frames_read < claimed:
                    raise InputError.about(source, f"truncated or corrupt audio: decoding failed after "
                                                   f"{_duration(frames_read / rate)} of the "
                                                   f"{_duration(claimed / rate)} its header says "
                                                   f"({_sf_reason(err)})") from err
                raise InputError.about(source, f"cannot decode audio ({_sf_reason(err)})") from err
            frames_read += len(block)
            if max_frames is not None and frames_read > max_frames:
                raise InputError.about(source, f"audio is longer than the {_duration(max_s)} limit "
                                               "(audio.max_audio_s); decoding stopped there")
            last = len(block) < _BLOCK_FRAMES
            if not np.isfinite(block).all():
                raise InputError.about(source, "audio contains NaN or infinite samples")
            if select is not None:
                block = block[:, select : select + 1]
            elif mix and n_channels > 1:
                block = block.mean(axis=1, keepdims=True, dtype=np.float32)
            if stream is not None:
                block = stream.resample_chunk(np.ascontiguousarray(block), last=last)
            if len(block):
                peak = max(peak, _peak(block))
                out.append(block)
            if last:
                break
        if (claimed is not None and f.format in _EXACT_LENGTH_FORMATS
                and claimed - frames_read > _TRUNCATION_SLACK_S * rate):
            raise InputError.about(source, f"truncated audio: the header says {_duration(claimed / rate)} but "
                                           f"the file holds {_duration(frames_read / rate)} (an upload or "
                                           "copy cut short?)")
    wave = out.array()
    # Resampling can overshoot full scale slightly, and float files may hold values past 1.0: scale
    # down (never clip) so the contract "within [-1, 1]" holds without distortion.
    if peak > 1.0:
        wave *= np.float32(1.0 / peak)
    return wave


class _Samples:
    """A growing (frames, channels) float32 buffer: blocks are copied in, no list of parts to join."""

    def __init__(self, channels: int, capacity: int):
        self._buf = np.empty((max(1, capacity), channels), dtype=np.float32)
        self._n = 0

    def append(self, block: np.ndarray) -> None:
        end = self._n + len(block)
        if end > len(self._buf):  # the header's count was low (or absent): grow by half again
            grown = np.empty((max(end, len(self._buf) * 3 // 2), self._buf.shape[1]), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : end] = block
        self._n = end

    def array(self) -> np.ndarray:
        return self._buf[: self._n]


def _wav_claimed_frames(data: bytes) -> int | None:
    """Frames a RIFF/WAVE header's data chunk claims (None: not a WAV, or a streaming-length header).

    libsndfile reports a WAV's frames from the bytes actually present, so a file cut short cannot be
    told from a short file through it: the header's own data size is read here."""
    head = bytes(data[:12])
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align, end = 12, None, min(len(data), 1 << 20)
    while pos + 8 <= end:
        chunk_id = bytes(data[pos : pos + 4])
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"fmt " and pos + 22 <= len(data):
            block_align = int.from_bytes(data[pos + 20 : pos + 22], "little")
        elif chunk_id == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):  # 0 / all ones: "length unknown" (streamed)
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _duration(seconds: float) -> str:
    """'5.2 s', '12 min 30 s', '8 h 0 min' for messages."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _check_not_empty(wave: np.ndarray, source: str) -> None:
    if wave.size == 0:
        raise InputError.about(source, "empty audio: the file holds no samples")


def _check_signal(wave: np.ndarray, source: str) -> None:
    _check_not_empty(wave, source)
    if _peak(wave) < SILENCE_PEAK:
        raise InputError.about(source, "silent audio: no signal")


def _peak(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    return float(max(abs(float(x.max())), abs(float(x.min()))))  # no |x| copy of a long signal


def _sf_reason(err: Exception) -> str:
    """libsndfile's own reason ("Format not recognised"), without the "Error opening <BytesIO ...>" noise."""
    reason = (getattr(err, "error_string", None) or str(err)).strip().rstrip(".")
    if not reason or reason.startswith("Error opening <") and reason.endswith(">:"):
        code = getattr(err, "code", None)
        return f"libsndfile error {code}, no reason given" if code is not None else "no reason given"
    if "does not exist or is not a regular file" in reason:  # libsndfile's words for unparseable memory input
        return "unrecognised or truncated audio data"
    return reason


