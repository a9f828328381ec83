"""Pillow under the project's limits, shared by kind sniffing and page decoding: the pixel cap (Pillow's
limit is process-global, so it is set under a lock) and a TIFF's full-resolution frames."""
from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

_PIL_LOCK = threading.RLock()  # Image.MAX_IMAGE_PIXELS is process-global: set it under a lock


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
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


# TIFF tags that mark a frame as a reduced-resolution copy of another (a pyramid's overview level, a
# thumbnail): NewSubfileType (254) bit 0, and the older SubfileType (255) value 2
_NEW_SUBFILE_TYPE, _SUBFILE_TYPE = 254, 255
_REDUCED_RESOLUTION_BIT, _OLD_REDUCED_RESOLUTION = 0x1, 2


def full_resolution_frames(im: Image.Image) -> list[int]:
    """Indices of the frames of a multi-frame image that are pages: TIFF frames flagged as reduced-
    resolution (pyramidal TIFFs' overviews, embedded thumbnails) are skipped. Walks the frame directory
    only (no pixels decoded). A TIFF whose every frame is flagged keeps them all: nothing is dropped."""
    n = int(getattr(im, "n_frames", 1))
    frames = []
    with pixel_limit(None):
        for index in range(n):
            im.seek(index)
            tags = getattr(im, "tag_v2", {})
            reduced = int(tags.get(_NEW_SUBFILE_TYPE, 0) or 0) & _REDUCED_RESOLUTION_BIT or \
                tags.get(_SUBFILE_TYPE) == _OLD_REDUCED_RESOLUTION
            if not reduced:
                frames.append(index)
        im.seek(0)
    return frames or list(range(n))


def tiff_page_count(data: bytes) -> int:
    """Page count of a TIFF (walks the IFD chain only; no pixels decoded). 1 when unreadable."""
    try:
        with pixel_limit(None), Image.open(io.BytesIO(data), formats=["TIFF"]) as im:
            return len(full_resolution_frames(im))
    except Exception:  # noqa: BLE001 - sniffing must never raise; decode will report the real error
        return 1
