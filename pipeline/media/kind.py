"""Which decoder an input needs: "audio", "image", "document" (PDF or multi-page TIFF) or "unknown",
from its magic bytes first (extensions lie), its extension second. Nothing is decoded here."""
from __future__ import annotations

from pathlib import PurePosixPath

from pipeline.media.pillow_limits import tiff_page_count



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
    if is_pdf(data):
        return "document"
    kind = _kind_from_magic(data)
    if kind != "unknown":
        return kind
    return _kind_from_extension(uri)




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
        return "document" if tiff_page_count(data) > 1 else "image"
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


def is_pdf(data: bytes) -> bool:
    """A PDF header at the start, or (PDF readers allow leading junk) within the first KiB of bytes
    that carry no other known signature."""
    head = bytes(data[:1024])
    if head.startswith(b"%PDF-"):
        return True
    return b"%PDF-" in head and _kind_from_magic(data) == "unknown"
