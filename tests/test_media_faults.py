"""Media that used to pass for good or cost too much: over-long and truncated audio, and the messages
for files the pipeline misnamed (a 0-page PDF, an AVIF, a BMP with a broken palette)."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.media.audio import SAMPLE_RATE, decode_audio, decode_audio_channels
from pipeline.media.kind import sniff_kind
from pipeline.media.pages import decode_pages
from pipeline.stages.prepare_audio import PrepareAudio
from pipeline.context import RunContext
from schemas.config import JobConfig
from schemas.manifest import validate_manifest
from tests.conftest import SAMPLES


def encode(audio: np.ndarray, rate: int, fmt: str, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def flac_claiming(total_frames: int) -> bytes:
    """A 1 s FLAC whose STREAMINFO says it holds `total_frames` frames (the 36 low bits of bytes 18..25)."""
    data = bytearray(encode(tone(1.0), SAMPLE_RATE, "FLAC"))
    assert data[:4] == b"fLaC"
    word = int.from_bytes(data[18:26], "big")
    data[18:26] = ((word >> 36 << 36) | total_frames).to_bytes(8, "big")
    return bytes(data)


# -- (6) a maximum duration, checked before decoding -----------------------------------------------------

def test_eight_hours_by_header_are_refused_before_decoding():
    data = flac_claiming(8 * 3600 * SAMPLE_RATE)  # what an 8 h silent FLAC of 0.73 MB says of itself
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(InputError) as err:
            decode_audio(data, "calls/night.flac", max_s=4 * 3600)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value) == ("calls/night.flac: audio is 8 h 0 min long, over the 4 h 0 min limit "
                              "(audio.max_audio_s); not decoded")
    assert time.monotonic() - started < 1 and peak < 20e6  # nothing decoded (8 h at 16 kHz: 1.8 GB)
    with pytest.raises(InputError, match="over the 4 h 0 min limit"):
        decode_audio_channels(data, "calls/night.flac", max_s=4 * 3600)


def test_max_duration_is_a_limit_not_a_cut():
    data = encode(tone(3.0), SAMPLE_RATE, "WAV")
    with pytest.raises(InputError, match=r"audio is 3\.0 s long, over the 2\.0 s limit"):
        decode_audio(data, "a.wav", max_s=2.0)
    assert len(decode_audio(data, "a.wav", max_s=3.0)) == 3 * SAMPLE_RATE
    assert len(decode_audio(data, "a.wav")) == 3 * SAMPLE_RATE  # no limit given: none applied


def test_without_a_length_in_the_header_decoding_stops_at_the_limit(monkeypatch):
    import pipeline.media.audio as media

    monkeypatch.setattr(media, "_UNKNOWN_FRAMES", 1)  # every header's frame count taken as "not known"
    data = encode(tone(10.0), SAMPLE_RATE, "FLAC")
    with pytest.raises(InputError, match=r"a\.flac: audio is longer than the 2\.0 s limit \(audio.max_audio_s\); "
                                         "decoding stopped there"):
        decode_audio(data, "a.flac", max_s=2.0)
    wave = decode_audio(data, "a.flac", max_s=10.5)  # the buffer, sized without a count, grows as it must
    np.testing.assert_allclose(wave, tone(10.0), atol=1e-4)


def test_decoding_holds_about_one_copy_of_the_output():
    """8 min of 44.1 kHz audio: the 16 kHz output (31 MB) is filled in place, not joined from parts."""
    data = encode(tone(480.0, 44100), 44100, "WAV")
    tracemalloc.start()
    try:
        wave = decode_audio(data, "long.wav")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(len(wave) - 480 * SAMPLE_RATE) < 16
    assert peak < 1.5 * wave.nbytes, f"peak {peak / 1e6:.0f} MB for {wave.nbytes / 1e6:.0f} MB of output"


# -- (7) truncated audio is an error, not an ok transcript of a fragment --------------------------------

def test_truncated_wav_is_an_error():
    data = encode(tone(5.2), SAMPLE_RATE, "WAV")
    cut = data[: 44 + SAMPLE_RATE]  # 0.5 s of 16-bit mono after the 44-byte header
    with pytest.raises(InputError) as err:
        decode_audio(cut, "calls/cut.wav")
    assert str(err.value) == ("calls/cut.wav: truncated audio: the header says 5.2 s but the file holds "
                              "0.5 s (an upload or copy cut short?)")
    with pytest.raises(InputError, match="truncated audio"):
        decode_audio_channels(cut, "calls/cut.wav")


def test_truncated_flac_is_an_error():
    data = encode(tone(5.2), SAMPLE_RATE, "FLAC")
    with pytest.raises(InputError, match=r"calls/cut\.flac: truncated or corrupt audio: decoding failed after "
                                         r"\d+\.\d s of the 5\.2 s its header says"):
        decode_audio(data[: len(data) // 3], "calls/cut.flac")


def test_complete_and_streamed_wavs_are_not_truncated():
    data = bytearray(encode(tone(1.0), SAMPLE_RATE, "WAV"))
    assert len(decode_audio(bytes(data), "a.wav")) == SAMPLE_RATE
    data[40:44] = b"\xff\xff\xff\xff"  # a streaming writer's "length unknown"
    assert len(decode_audio(bytes(data), "a.wav")) == SAMPLE_RATE


# -- through PrepareAudio: error rows for those inputs only -------------------------------------------------

def test_prepare_turns_long_and_truncated_audio_into_error_rows(tiny_model):
    good = (SAMPLES / "audio" / "call_0001.wav").read_bytes()
    truncated = encode(tone(5.2), SAMPLE_RATE, "WAV")[: 44 + SAMPLE_RATE]
    table = validate_manifest(pa.Table.from_pylist([
        {"id": "good", "data": good},
        {"id": "long", "data": flac_claiming(8 * 3600 * SAMPLE_RATE)},
        {"id": "cut", "data": truncated},
    ]))
    config = JobConfig(job="transcribe", input="m.csv", output="out", model={"source": tiny_model},
                       translate_to=["fr"], audio={"max_audio_s": 3600})
    out = PrepareAudio(RunContext.for_tests(config, pa.schema([])))(table)
    assert out.num_rows == 3 * 2  # asr and translate for each of the three inputs
    errors = {(r["id"], r["task"]): r["error"] for r in out.to_pylist()}
    assert errors[("good", "asr")] is None and errors[("good", "translate")] is None
    for task in ("asr", "translate"):
        assert "over the 1 h 0 min limit (audio.max_audio_s)" in errors[("long", task)]
        assert "truncated audio: the header says 5.2 s but the file holds 0.5 s" in errors[("cut", task)]


# -- (10) messages that name the real problem --------------------------------------------------------------

def _pdf(objects: list[bytes]) -> bytes:
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_zero_page_pdf_says_it_has_no_pages():
    empty = _pdf([b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[]/Count 0>>"])
    with pytest.raises(InputError) as err:
        decode_pages(empty, "docs/empty.pdf")
    assert str(err.value) == "docs/empty.pdf: cannot open PDF: it has no pages (an empty page tree)"
    assert "Success" not in str(err.value)


def test_avif_is_an_image():
    Image.init()
    if "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow has no AVIF plugin")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, "AVIF")
    data = buffer.getvalue()
    assert sniff_kind(data, "scans/photo") == "image"
    (page,) = decode_pages(data, "scans/photo.avif")
    assert page.size == (64, 48) and page.mode == "RGB"


def test_bmp_with_a_broken_palette_says_so():
    image = Image.new("P", (8, 8))
    image.putpalette(bytes(range(48)) * 16)
    buffer = io.BytesIO()
    image.save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[46:50] = struct.pack("<I", 300)  # biClrUsed: 300 colours in an 8-bit palette
    with pytest.raises(InputError) as err:
        decode_pages(bytes(data), "scans/page.bmp")
    assert str(err.value).startswith("scans/page.bmp: cannot decode image: its colour palette is corrupt")
    assert "unsupported colour mode" not in str(err.value)
