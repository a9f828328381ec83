"""Real-size documents for tests and benchmarks: text PDFs of any page count (Letter or A4), and scans.

The PDFs are what office software writes for a typed report: every page a real page size with a few
lines of Helvetica, so pypdfium2 renders each at its true pixel size (1275x1650 at 150 dpi for Letter)
while the file stays small (a 300-page PDF is ~60 KB).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

LETTER_PT = (612, 792)
A4_PT = (595, 842)
LETTER_150_DPI = (1275, 1650)


def text_pdf(pages: int, size_pt: tuple[int, int] = LETTER_PT, title: str = "Report") -> bytes:
    """A PDF of `pages` pages of `size_pt` points, each with a heading and a few lines of text."""
    width, height = size_pt
    objects: list[bytes] = [b"<</Type/Catalog/Pages 2 0 R>>", b"",  # the page tree is filled in below
                            b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>"]
    kids = []
    for number in range(1, pages + 1):
        lines = [f"{title}: page {number} of {pages}"] + \
                [f"Line {k}: invoice {number * 100 + k}, amount {number * 7 % 1000}.{k:02d} EUR, paid"
                 for k in range(1, 9)]
        text = b"BT /F1 14 Tf 72 %d Td 18 TL " % (height - 90) + \
            b" ".join(b"(%s) '" % line.encode("latin-1") for line in lines) + b" ET"
        objects.append(b"<</Length %d>>\nstream\n%s\nendstream" % (len(text), text))
        objects.append(b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 %d %d]/Resources<</Font<</F1 3 0 R>>>>"
                       b"/Contents %d 0 R>>" % (width, height, len(objects)))
        kids.append(len(objects))
    objects[1] = b"<</Type/Pages/Kids[%s]/Count %d>>" % (b" ".join(b"%d 0 R" % k for k in kids), pages)
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def scan(size: tuple[int, int], seed: int, text: str = "Scanned page") -> Image.Image:
    """A scanned page: paper-grey noise (so it compresses like a scan, not like a blank), a few lines."""
    rng = np.random.default_rng(seed)
    w, h = size
    paper = (235 + rng.integers(-12, 12, (h // 4, w // 4, 1), dtype=np.int16)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(paper, 3, axis=2)).resize(size)
    draw = ImageDraw.Draw(image)
    for k in range(12):
        draw.text((w // 12, h // 10 + k * h // 20), f"{text} {seed}, line {k + 1}", fill=(20, 20, 20))
    return image


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()
