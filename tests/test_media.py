"""pipeline.media: what a user checks of decoded media, on the committed samples and in-memory files."""
from __future__ import annotations

import csv
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline.media.audio import SAMPLE_RATE, decode_audio, decode_audio_channels
from pipeline.media.kind import sniff_kind
from pipeline.media.pages import count_pages, decode_pages
from pipeline.core.errors import InputError

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
HAS_MP3 = "MP3" in sf.available_formats()


def encode(audio: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


# ---- audio ---------------------------------------------------------------------------------------------

AUDIO_CASES = [
    ("WAV", "PCM_16", 16000, 1),
    ("WAV", "FLOAT", 8000, 1),
    ("FLAC", "PCM_24", 44100, 2),
    ("OGG", "VORBIS", 22050, 1),
    ("OGG", "OPUS", 48000, 2),
    pytest.param(
        "MP3", "MPEG_LAYER_III", 24000, 1, marks=pytest.mark.skipif(not HAS_MP3, reason="no MP3 in libsndfile")
    ),
]


@pytest.mark.parametrize("fmt,subtype,rate,channels", AUDIO_CASES)
def test_each_format_decodes_to_16k_mono_of_the_right_duration(fmt, subtype, rate, channels):
    data = encode(tone(2.0, rate, channels), rate, fmt, subtype)
    wave = decode_audio(data, f"clip.{fmt.lower()}")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == pytest.approx(2.0 * SAMPLE_RATE, rel=0.01)
    assert np.abs(wave).max() <= 1.0
    assert np.abs(wave).max() == pytest.approx(0.5, abs=0.1)  # level kept, not normalised away


def sample_clips() -> list[tuple[str, str]]:
    with open(SAMPLES / "audio" / "transcripts.tsv", encoding="utf-8") as f:
        return [(row["file"], row["text"]) for row in csv.DictReader(f, delimiter="\t")]


@pytest.mark.parametrize("name,text", sample_clips())
def test_sample_clips_decode_with_their_recorded_duration(name, text):
    path = SAMPLES / "audio" / name
    wave = decode_audio(path.read_bytes(), str(path))
    expected_s = sf.info(str(path)).duration
    assert 2.0 <= expected_s <= 8.0
    assert len(wave) / SAMPLE_RATE == pytest.approx(expected_s, rel=0.01)
    assert text and wave.ndim == 1


def test_stereo_call_splits_into_agent_and_customer_channels():
    data = (SAMPLES / "audio" / "call_0002.flac").read_bytes()
    left, right = decode_audio_channels(data, "call_0002.flac")
    assert len(left) == len(right)
    cut = int(len(left) * 0.4)  # the agent (left) speaks first, the customer (right) answers last
    assert np.abs(left[:cut]).max() > 0.1 and np.abs(right[:cut]).max() < 1e-3
    assert np.abs(right[-cut:]).max() > 0.1 and np.abs(left[-cut:]).max() < 1e-3
    np.testing.assert_allclose(decode_audio(data, "x", channels="left"), left, atol=1e-6)
    np.testing.assert_allclose(decode_audio(data, "x", channels="mix"), (left + right) / 2, atol=1e-3)


def test_one_muted_channel_is_kept_but_all_silent_is_refused():
    one_side = tone(1.0, 16000, 2)
    one_side[:, 1] = 0
    left, right = decode_audio_channels(encode(one_side, 16000, "WAV", "PCM_16"), "call.wav")
    assert np.abs(left).max() > 0.1 and np.abs(right).max() == 0
    with pytest.raises(InputError, match="^call.wav: silent audio"):
        decode_audio_channels(encode(np.zeros((16000, 2)), 16000, "WAV", "PCM_16"), "call.wav")


def test_undecodable_bytes_raise_input_error_naming_the_source():
    with pytest.raises(InputError) as info:
        decode_audio(b"this is not audio, it is a text file" * 10, "calls/0042.wav")
    assert str(info.value).startswith("calls/0042.wav: cannot decode audio (")
    assert "BytesIO" not in str(info.value)
    assert info.value.source == "calls/0042.wav"


def test_empty_audio_is_refused():
    with pytest.raises(InputError, match="^calls/empty.wav: empty audio"):
        decode_audio(encode(np.zeros(0, dtype=np.float32), 16000, "WAV", "PCM_16"), "calls/empty.wav")


@pytest.mark.parametrize("level", [0.0, 2e-5])
def test_digital_silence_is_refused(level):
    noise = (np.random.default_rng(0).uniform(-1, 1, 16000) * level).astype(np.float32)
    with pytest.raises(InputError, match="^calls/quiet.wav: silent audio: no signal"):
        decode_audio(encode(noise, 16000, "WAV", "FLOAT"), "calls/quiet.wav")


def test_input_error_survives_pickling_with_its_source():  # Ray ships exceptions between processes
    err = pickle.loads(pickle.dumps(InputError.about("s3://b/k.wav", "empty audio")))
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert str(err) == "s3://b/k.wav: empty audio"
    assert err.source == "s3://b/k.wav" and err.reason == "empty audio"


# ---- sniffing ------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(pages: int) -> bytes:
    frames = [Image.new("L", (40, 30), 60 * i) for i in range(pages)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.mark.parametrize(
    "path,kind",
    [
        ("audio/call_0001.wav", "audio"),
        ("audio/call_0002.flac", "audio"),
        ("audio/call_0003.ogg", "audio"),
        ("audio/call_0004.mp3", "audio"),
        ("docs/invoice.png", "image"),
        ("docs/invoice.jpg", "image"),
        ("docs/packet.pdf", "document"),
    ],
)
def test_sniff_kind_reads_magic_bytes_not_names(path, kind):
    if not (SAMPLES / path).exists():
        pytest.skip(f"{path} not generated")
    assert sniff_kind((SAMPLES / path).read_bytes(), "misleading-name.bin") == kind


def test_sniff_kind_tiff_pages_and_extension_fallback():
    assert sniff_kind(tiff_bytes(1)) == "image"
    assert sniff_kind(tiff_bytes(3)) == "document"
    assert sniff_kind(b"\x00" * 32, "s3://bucket/calls/a.MP3") == "audio"
    assert sniff_kind(b"\x00" * 32, "https://host/scan.pdf?version=2#p1") == "document"
    assert sniff_kind(b"\x00" * 32, "x.webp") == "image"
    assert sniff_kind(b"hello world") == "unknown"


# ---- pages ---------------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_sample_png_is_one_rgb_page():
    pages = decode_pages((SAMPLES / "docs" / "invoice.png").read_bytes(), "invoice.png")
    assert len(pages) == 1 and pages[0].mode == "RGB" and pages[0].size == (1200, 1600)


def test_two_page_pdf_gives_two_rendered_pages():
    data = (SAMPLES / "docs" / "packet.pdf").read_bytes()
    pages = decode_pages(data, "packet.pdf")
    assert len(pages) == 2 and count_pages(data, "packet.pdf") == 2
    assert all(p.mode == "RGB" and p.size == (1200, 1600) for p in pages)  # 8x10.67 in at 150 dpi
    assert np.asarray(pages[0]).mean() != pytest.approx(np.asarray(pages[1]).mean(), abs=0.01)  # two pages
    low = decode_pages(data, "packet.pdf", pdf_dpi=72, max_pages=1)
    assert len(low) == 1 and low[0].size == (576, 768)


@pytest.mark.parametrize(
    "mode,fmt",
    [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("P", "PNG"), ("P", "GIF"), ("L", "PNG"), ("1", "TIFF"),
     ("RGBA", "PNG"), ("LA", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("I;16", "PNG")],
)
def test_every_colour_mode_comes_back_rgb(mode, fmt):
    if mode == "I;16":
        image = Image.new("I;16", (64, 48), 32768)
    else:
        image = Image.new("RGB", (64, 48), (200, 40, 40)).convert(mode)
    [page] = decode_pages(encoded(image, fmt), f"scan.{fmt.lower()}")
    assert page.mode == "RGB" and page.size == (64, 48)
    if mode == "I;16":  # 16-bit grey is scaled, not clipped to white
        assert np.asarray(page)[0, 0, 0] == pytest.approx(128, abs=1)


def test_transparency_is_flattened_on_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    [page] = decode_pages(encoded(image, "PNG"), "logo.png")
    assert page.getpixel((5, 5)) == (255, 255, 255) and page.getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    [page] = decode_pages(encoded(palette, "PNG", transparency=0), "p.png")
    assert page.getpixel((5, 5)) == (255, 255, 255)


def test_multipage_tiff_gives_every_page_and_gif_only_its_first_frame():
    pages = decode_pages(tiff_bytes(3), "fax.tiff")
    assert [p.getpixel((0, 0))[0] for p in pages] == [0, 60, 120]
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert len(decode_pages(gif, "anim.gif")) == 1


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    [page] = decode_pages(encoded(Image.new("RGB", (200, 100), "white"), "JPEG", exif=exif), "photo.jpg")
    assert page.size == (100, 200)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_exif_orientation_is_applied_once_in_every_format(fmt):
    """A scan tagged "rotate 90" comes out upright, once (Pillow's TIFF loader rotates by itself)."""
    image = Image.new("RGB", (200, 100), "white")
    image.paste((0, 0, 0), (0, 0, 20, 20))  # a mark in the top-left corner, to see where it goes
    exif = Image.Exif()
    exif[0x0112] = 6
    [page] = decode_pages(encoded(image, fmt, exif=exif), f"scan.{fmt.lower()}")
    assert page.size == (100, 200)
    assert page.getpixel((95, 5))[0] < 60 and page.getpixel((5, 5))[0] > 200  # now top-right


def png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_as_input_errors():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match="^bomb.png: "):
        decode_pages(png_header_claiming(100_000, 100_000), "bomb.png")
    with pytest.raises(InputError, match="^big.png: .*limit"):  # between 1x and 2x Pillow's limit too
        decode_pages(png_header_claiming(7000, 7000), "big.png")
    with pytest.raises(InputError, match="^invoice.png: image is 1200x1600 pixels"):
        decode_pages((SAMPLES / "docs" / "invoice.png").read_bytes(), "invoice.png", max_pixels=1_000_000)
    with pytest.raises(InputError, match="^packet.pdf: page 1 of 2 would render"):
        decode_pages((SAMPLES / "docs" / "packet.pdf").read_bytes(), "packet.pdf", max_pixels=1_000_000)
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is restored for other code


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"definitely not an image" * 20, "cannot decode image"),
        (b"%PDF-1.7\n garbage that is no PDF", "cannot open PDF"),
    ],
)
def test_undecodable_pages_raise_input_error_naming_the_source(data, reason):
    with pytest.raises(InputError, match=f"^scans/0007: {reason}"):
        decode_pages(data, "scans/0007")


def test_truncated_image_is_an_input_error():
    data = (SAMPLES / "docs" / "invoice.png").read_bytes()
    with pytest.raises(InputError, match="^cut.png: cannot decode"):
        decode_pages(data[: len(data) // 2], "cut.png")
