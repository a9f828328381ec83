"""Bytes -> model-ready media: 16 kHz mono float32 audio, RGB page images.

Every function here takes the raw bytes of one input plus its name (`source`, the uri or id) and either
returns decoded media or raises `InputError` with a sentence naming that input and the cause, so a bad
file becomes an error row and never a failed job. Nothing here touches the network or the GPU.

- `sniff_kind`: which decoder an input needs (magic bytes first: extensions lie).
- `decode_audio` / `decode_audio_channels`: soundfile (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...),
  streamed in blocks through soxr so an hour of 44.1 kHz stereo never sits in memory at its source rate.
- `open_pages` (and `decode_pages` / `iter_pages` / `count_pages` on it): Pillow for images (a multi-page
  TIFF's full-resolution frames page by page; pyramid overviews and thumbnails skipped), pypdfium2 for PDFs,
  the page count known before any page is rendered, each page rendered on its own and flattened to RGB,
  with a pixel cap checked *before* its pixels are decoded.
"""
from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath

import numpy as np
import soundfile as sf
import soxr
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.errors import InputError

__all__ = [
    "SAMPLE_RATE",
    "SILENCE_PEAK",
    "sniff_kind",
    "decode_audio",
    "decode_audio_channels",
    "decode_pages",
    "iter_pages",
    "count_pages",
    "open_pages",
    "PageSource",
]

SAMPLE_RATE = 16000
"""The model's audio rate: every decoded waveform comes back at this rate."""

SILENCE_PEAK = 1e-4
"""Peak level (full scale = 1.0) under which audio counts as digital silence: about -80 dBFS."""

_BLOCK_FRAMES = 1 << 20  # ~65 s at 16 kHz per read: bounds memory for long files, few Python round trips

# ----------------------------------------------------------------------------------------------------
# Kind sniffing
# ----------------------------------------------------------------------------------------------------

_AUDIO_EXT = {
    "wav", "wave", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc", "au", "snd", "caf",
    "w64", "rf64", "m4a", "aac",
}
_IMAGE_EXT = {
    "png", "jpg", "jpeg", "jpe", "jfif", "webp", "bmp", "dib", "gif", "tif", "tiff", "jp2", "j2k",
    "ppm", "pgm", "pbm", "pnm", "avif",
}
_DOCUMENT_EXT = {"pdf"}


def sniff_kind(data: bytes, uri: str | None = None) -> str:
    """Return "audio", "image", "document" (PDF or multi-page TIFF) or "unknown".

    Magic bytes decide first (a .wav that is really an MP3 still decodes, a .jpg that is really a PDF
    goes to the PDF renderer); the uri's extension is only the fallback for bytes we don't recognise.
    """
    if _is_pdf(data):
        return "document"
    kind = _kind_from_magic(data)
    if kind != "unknown":
        return kind
    return _kind_from_extension(uri)


def _is_pdf(data: bytes) -> bool:
    """A PDF header at the start, or (PDF readers allow leading junk) within the first KiB of bytes
    that carry no other known signature."""
    head = bytes(data[:1024])
    if head.startswith(b"%PDF-"):
        return True
    return b"%PDF-" in head and _kind_from_magic(data) == "unknown"


def _kind_from_magic(data: bytes) -> str:
    head = bytes(data[:64])
    if head[:4] == b"RIFF" and len(head) >= 12:
        if head[8:12] == b"WAVE":
            return "audio"
        if head[8:12] == b"WEBP":
            return "image"
        return "unknown"
    if head[:4] in (b"RF64", b"fLaC", b"OggS", b".snd", b"caff") or head[:4] == b"riff":  # riff: W64
        return "audio"
    if head[:3] == b"ID3":
        return "audio"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio"
    if head[4:8] == b"ftyp" and head[8:12] in (b"M4A ", b"M4B "):
        return "audio"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):  # AVIF (an ISO-BMFF image)
        return "image"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "image"
    if head[:2] == b"BM" and len(head) >= 26 and head[6:10] == b"\0\0\0\0":
        return "image"
    if head[:12] == b"\0\0\0\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000
        return "image"
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # TIFF / BigTIFF
        return "document" if _tiff_pages(data) > 1 else "image"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:  # MPEG audio frame sync
        return "audio"
    return "unknown"


def _kind_from_extension(uri: str | None) -> str:
    if not uri:
        return "unknown"
    path = uri.split("?", 1)[0].split("#", 1)[0]
    ext = PurePosixPath(path).suffix.lower().lstrip(".")
    if ext in _AUDIO_EXT:
        return "audio"
    if ext in _IMAGE_EXT:
        return "image"
    if ext in _DOCUMENT_EXT:
        return "document"
    return "unknown"


def _tiff_pages(data: bytes) -> int:
    """Page count of a TIFF (walks the IFD chain only; no pixels decoded). 1 when unreadable."""
    try:
        with _pixel_limit(None), Image.open(io.BytesIO(data), formats=["TIFF"]) as im:
            return len(_full_resolution_frames(im))
    except Exception:  # noqa: BLE001 - sniffing must never raise; decode will report the real error
        return 1


# ----------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Pages (images and documents)
# ----------------------------------------------------------------------------------------------------

# Formats we accept. Restricting Image.open keeps out plugins with large attack surfaces (EPS runs
# Ghostscript, PSD, ...) that a document pipeline has no use for.
# (MPO, cameras' multi-picture JPEG, opens through the JPEG plugin; its first picture is the page.)
# (AVIF needs Pillow >= 11.2 built with libavif; where the plugin is missing it is simply not offered.)
_PIL_FORMATS = ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "DIB", "GIF", "JPEG2000", "PPM", "AVIF"]
_FORMAT_NAMES = {"WEBP": "WebP", "JPEG2000": "JPEG 2000", "PPM": "PNM"}
_MULTI_PAGE_FORMATS = {"TIFF"}  # GIF/WebP/MPO frames are animation or previews: first frame only

_PIL_LOCK = threading.RLock()  # Image.MAX_IMAGE_PIXELS is process-global: set it under a lock
_PDFIUM_LOCK = threading.RLock()  # pdfium is not thread-safe


def decode_pages(
    data: bytes,
    source: str,
    *,
    max_pixels: int = 40_000_000,
    pdf_dpi: int = 150,
    max_pages: int | None = None,
) -> list[Image.Image]:
    """Decode an image or a document into RGB pages (one for a plain image, one per PDF/TIFF page).

    max_pixels: any page with width*height above it is refused (InputError) before its pixels are
    decoded or rendered: a 100000x100000 PNG header costs nothing to send and 30 GB to decode.
    pdf_dpi: PDF render resolution. max_pages: keep only the first `max_pages` pages (None: all);
    `count_pages` gives the full count. Raises InputError for undecodable or oversized input.
    """
    return list(iter_pages(data, source, max_pixels=max_pixels, pdf_dpi=pdf_dpi, max_pages=max_pages))


def iter_pages(
    data: bytes,
    source: str,
    *,
    max_pixels: int = 40_000_000,
    pdf_dpi: int = 150,
    max_pages: int | None = None,
) -> Iterator[Image.Image]:
    """Like `decode_pages`, one page at a time, so a 300-page PDF needn't be held rendered in memory."""
    if max_pages is not None and max_pages < 1:
        raise ValueError(f"max_pages must be at least 1, not {max_pages}")
    with open_pages(data, source, max_pixels=max_pixels, pdf_dpi=pdf_dpi) as pages:
        for index in range(pages.count if max_pages is None else min(pages.count, max_pages)):
            yield pages.render(index)


def count_pages(data: bytes, source: str) -> int:
    """Number of pages without rendering any: PDF pages, full-resolution TIFF frames, else 1. InputError
    if unreadable."""
    with open_pages(data, source) as pages:
        return pages.count


class PageSource:
    """One opened image or document: `count` pages known up front (no pixels decoded), each rendered on
    its own by `render(index)` (0-based), which raises InputError for that page alone (an oversized or
    unrenderable page), so a caller can make an error row for it and go on with the next.

    The input's bytes are held once, by the open document, for as long as the source is open; a
    rendered page is the caller's to drop. Close it (or use it as a context manager) when done.
    """

    count: int

    def render(self, index: int) -> Image.Image:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "PageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pages(data: bytes, source: str, *, max_pixels: int = 40_000_000, pdf_dpi: int = 150) -> PageSource:
    """The pages of an image or a document (PDF through pypdfium2, else Pillow), opened, none rendered.
    Raises InputError when the input cannot be opened at all."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, not {max_pixels}")
    if _is_pdf(data):
        return _PdfPages(data, source, max_pixels=max_pixels, dpi=pdf_dpi)
    return _ImagePages(data, source, max_pixels=max_pixels)


@contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set Pillow's bomb limit for the duration of one open/load, then restore it for other code.

    Pillow only *warns* between 1x and 2x its limit; we do our own exact check on each page's size,
    so its warning is silenced here and its error (over 2x) is converted by the caller.
    """
    with _PIL_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open_image(data: bytes, source: str, max_pixels: int | None = None) -> Image.Image:
    Image.init()  # Pillow raises KeyError for a format name it has no plugin for: ask only for those it has
    formats = [name for name in _PIL_FORMATS if name in Image.OPEN]
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as err:
        limit = f"the {max_pixels / 1e6:.1f} MP limit" if max_pixels else "the pixel limit"
        raise InputError.about(source, f"image is over {limit} (possible decompression bomb): {err}") from err
    except UnidentifiedImageError as err:
        names = ", ".join(_FORMAT_NAMES.get(name, name) for name in formats if name != "DIB")
        raise InputError.about(source, f"cannot decode image (not a {names} or PDF file)") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InputError.about(source, f"cannot decode image ({err})") from err


class _ImagePages(PageSource):
    """A plain image (one page) or a multi-page TIFF: its full-resolution frames are the pages."""

    def __init__(self, data: bytes, source: str, *, max_pixels: int):
        self.source, self.max_pixels = source, max_pixels
        with _pixel_limit(max_pixels):
            self._im = _open_image(data, source, max_pixels)
        try:
            self._frames = _full_resolution_frames(self._im) if self._im.format in _MULTI_PAGE_FORMATS else [0]
        except (OSError, ValueError, EOFError, SyntaxError) as err:
            self._im.close()
            raise InputError.about(source, f"cannot read the TIFF's page directory ({err})") from err
        self.count = len(self._frames)

    def render(self, index: int) -> Image.Image:
        with _pixel_limit(self.max_pixels):  # one page decoded under the limit, the lock released after
            return _decode_frame(self._im, self._frames[index], index, self.count, self.source, self.max_pixels)

    def close(self) -> None:
        self._im.close()


# TIFF tags that mark a frame as a reduced-resolution copy of another (a pyramid's overview level, a
# thumbnail): NewSubfileType (254) bit 0, and the older SubfileType (255) value 2
_NEW_SUBFILE_TYPE, _SUBFILE_TYPE = 254, 255
_REDUCED_RESOLUTION_BIT, _OLD_REDUCED_RESOLUTION = 0x1, 2


def _full_resolution_frames(im: Image.Image) -> list[int]:
    """Indices of the frames of a multi-frame image that are pages: TIFF frames flagged as reduced-
    resolution (pyramidal TIFFs' overviews, embedded thumbnails) are skipped. Walks the frame directory
    only (no pixels decoded). A TIFF whose every frame is flagged keeps them all: nothing is dropped."""
    n = int(getattr(im, "n_frames", 1))
    frames = []
    with _pixel_limit(None):
        for index in range(n):
            im.seek(index)
            tags = getattr(im, "tag_v2", {})
            reduced = int(tags.get(_NEW_SUBFILE_TYPE, 0) or 0) & _REDUCED_RESOLUTION_BIT or \
                tags.get(_SUBFILE_TYPE) == _OLD_REDUCED_RESOLUTION
            if not reduced:
                frames.append(index)
        im.seek(0)
    return frames or list(range(n))


def _decode_frame(im: Image.Image, frame: int, index: int, n: int, source: str, max_pixels: int) -> Image.Image:
    """Frame `frame` of `im` as RGB, the page `index` (0-based) of `n` in messages."""
    where = f"page {index + 1} of {n}" if n > 1 else "image"
    try:
        if im.tell() != frame:
            im.seek(frame)
        width, height = im.size
        if width * height > max_pixels:
            raise InputError.about(
                source,
                f"{where} is {width}x{height} pixels ({width * height / 1e6:.1f} MP), over the "
                f"{max_pixels / 1e6:.1f} MP limit (possible decompression bomb); "
                "downscale it or raise max_pixels",
            )
        rgb = _to_rgb(im, source)
        # Read from the source frame (the RGB copy may not carry its tags) once its pixels are loaded:
        # Pillow's TIFF loader applies the orientation itself and drops the tag, so it is not applied twice.
        orientation = im.getexif().get(ExifTags.Base.Orientation)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        limit = f"{max_pixels / 1e6:.1f} MP"
        reason = f"{where} is over the {limit} limit (possible decompression bomb): {err}"
        raise InputError.about(source, reason) from err
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise InputError.about(source, f"cannot decode {where} ({err})") from err
    if orientation is not None:  # phone photos of documents: upright text for OCR
        rgb.getexif()[ExifTags.Base.Orientation] = orientation
        ImageOps.exif_transpose(rgb, in_place=True)  # Pillow's table; also drops the tag it applied
    return rgb


def _to_rgb(im: Image.Image, source: str) -> Image.Image:
    """Any Pillow mode -> RGB: alpha flattened on white, 16-bit/float grey scaled (not clipped)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_grey_to_rgb(im)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        # Pillow converts every mode its plugins produce, so a failure here is bad data, not our gap:
        # a palette ("P") image whose palette is missing or of the wrong size, most often
        if mode in ("P", "PA") or "palette" in str(err).lower():
            raise InputError.about(source, f"cannot decode image: its colour palette is corrupt ({err})") from err
        raise InputError.about(source, f"cannot decode image: its {mode!r} pixels cannot be converted to RGB "
                                       f"({err})") from err


def _high_depth_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit and float greyscale scans: Pillow's own convert clips at 255 (a white page); scale instead."""
    arr = np.asarray(im, dtype=np.float32)
    if im.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        hi = float(arr.max()) if arr.size else 0.0
        if im.mode == "F" and hi <= 1.0:
            scale = 255.0
        elif hi <= 255.0:
            scale = 1.0
        elif hi <= 65535.0:
            scale = 255.0 / 65535.0
        else:
            scale = 255.0 / hi
    grey = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


_EMPTY_PAGE_TREE = re.compile(rb"/Type\s*/Pages\b[^>]*/Count\s+0\b")


def _open_pdf(data: bytes, source: str):  # -> pypdfium2.PdfDocument
    import pypdfium2 as pdfium  # imported here: only documents pay for it

    try:
        return pdfium.PdfDocument(bytes(data))
    except pdfium.PdfiumError as err:
        reason = str(err).strip().rstrip(".")
        if "password" in reason.lower():
            raise InputError.about(source, f"PDF is password-protected ({reason})") from err
        if reason.endswith("(PDFium: Success)") or _EMPTY_PAGE_TREE.search(bytes(data)):
            # PDFium refuses a document whose page tree is empty without setting an error code of its
            # own (the message then carries "Success", or whatever error a previous document left)
            raise InputError.about(source, "cannot open PDF: it has no pages (an empty page tree)") from err
        raise InputError.about(source, f"cannot open PDF ({reason})") from err


class _PdfPages(PageSource):
    """A PDF through pypdfium2: the page count from its page tree, each page rendered when asked."""

    def __init__(self, data: bytes, source: str, *, max_pixels: int, dpi: int):
        if dpi < 1:
            raise ValueError(f"pdf_dpi must be positive, not {dpi}")
        self.source, self.max_pixels, self.dpi = source, max_pixels, dpi
        with _PDFIUM_LOCK:
            self._pdf = _open_pdf(data, source)
            self.count = len(self._pdf)
        if self.count == 0:
            self.close()
            raise InputError.about(source, "PDF has no pages")

    def render(self, index: int) -> Image.Image:
        import pypdfium2 as pdfium

        source, dpi, n, scale = self.source, self.dpi, self.count, self.dpi / 72.0
        with _PDFIUM_LOCK:
            try:
                page = self._pdf[index]
                try:
                    w_pt, h_pt = page.get_size()
                    width, height = round(w_pt * scale), round(h_pt * scale)
                    if width * height > self.max_pixels:
                        raise InputError.about(
                            source,
                            f"page {index + 1} of {n} would render at {width}x{height} pixels at "
                            f"{dpi} dpi, over the {self.max_pixels / 1e6:.1f} MP limit; lower pdf_dpi or "
                            "raise max_pixels",
                        )
                    bitmap = page.render(scale=scale)
                    try:
                        return _to_rgb(bitmap.to_pil(), source)
                    finally:
                        bitmap.close()
                finally:
                    page.close()
            except pdfium.PdfiumError as err:
                raise InputError.about(source, f"cannot render PDF page {index + 1} of {n} ({err})") from err

    def close(self) -> None:
        with _PDFIUM_LOCK:
            self._pdf.close()
