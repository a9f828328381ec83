"""Bytes -> page images: Pillow for images (a multi-page TIFF's full-resolution frames page by page;
pyramid overviews and thumbnails skipped), pypdfium2 for PDFs. `open_pages` knows the page count before
any page is rendered; each page is rendered on its own and flattened to RGB, with a pixel cap checked
*before* its pixels are decoded (`decode_pages` / `iter_pages` / `count_pages` are built on it).

Every function takes the raw bytes of one input plus its name (`source`, the uri or id) and either returns
pages or raises `InputError` with a sentence naming that input and the cause, so a bad file becomes an
error row and never a failed job. Nothing here touches the network or the GPU.
"""
from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import InputError
from pipeline.media.kind import is_pdf
from pipeline.media.pillow_limits import full_resolution_frames, pixel_limit


# Formats we accept. Restricting Image.open keeps out plugins with large attack surfaces (EPS runs
# Ghostscript, PSD, ...) that a document pipeline has no use for.
# (MPO, cameras' multi-picture JPEG, opens through the JPEG plugin; its first picture is the page.)
# (AVIF needs Pillow >= 11.2 built with libavif; where the plugin is missing it is simply not offered.)
_PIL_FORMATS = ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "DIB", "GIF", "JPEG2000", "PPM", "AVIF"]
_FORMAT_NAMES = {"WEBP": "WebP", "JPEG2000": "JPEG 2000", "PPM": "PNM"}
_MULTI_PAGE_FORMATS = {"TIFF"}  # GIF/WebP/MPO frames are animation or previews: first frame only

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
    if is_pdf(data):
        return _PdfPages(data, source, max_pixels=max_pixels, dpi=pdf_dpi)
    return _ImagePages(data, source, max_pixels=max_pixels)





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
        with pixel_limit(max_pixels):
            self._im = _open_image(data, source, max_pixels)
        try:
            self._frames = full_resolution_frames(self._im) if self._im.format in _MULTI_PAGE_FORMATS else [0]
        except (OSError, ValueError, EOFError, SyntaxError) as err:
            self._im.close()
            raise InputError.about(source, f"cannot read the TIFF's page directory ({err})") from err
        self.count = len(self._frames)

    def render(self, index: int) -> Image.Image:
        with pixel_limit(self.max_pixels):  # one page decoded under the limit, the lock released after
            return _decode_frame(self._im, self._frames[index], index, self.count, self.source, self.max_pixels)

    def close(self) -> None:
        self._im.close()







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
