"""Build the committed sample inputs: short calls, a mock meeting, document pages, and their manifests.

Run from anywhere:  /work/venv/bin/python samples/make_samples.py   (needs espeak-ng on PATH)

Why synthetic: the samples must be redistributable, small (< ~6 MB in all) and carry their exact
reference text, so every job can be run and scored end to end offline. Speech comes from espeak-ng with
fixed voices and fixed sentences; pages are drawn with Pillow. Everything is deterministic: rerunning
with the same espeak-ng and library versions rewrites byte-identical files (the Ogg stream serial
number, random in libsndfile, is pinned; the PDF dates are fixed).

Manifests use uris *relative to the manifest's own folder* (e.g. "audio/call_0001.wav" in
samples/transcribe.csv), so they work whatever the current directory or checkout location is. A reader
must resolve a relative uri against the folder of the manifest file it came from.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent
ESPEAK_RATE = 22050  # espeak-ng's native output rate
PAGE_BREAK = "\f"  # separates pages in a multi-page document's reference text


# ----------------------------------------------------------------------------------------------------
# Speech
# ----------------------------------------------------------------------------------------------------


def speak(text: str, voice: str, speed: int = 160) -> np.ndarray:
    """espeak-ng -> float32 mono at 22.05 kHz, its own leading/trailing silence trimmed, peak 0.7."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is required: apt-get install espeak-ng")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True, capture_output=True
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == ESPEAK_RATE, rate
    loud = np.flatnonzero(np.abs(audio) > 1e-3)
    audio = audio[loud[0] : loud[-1] + 1]
    return (audio * (0.7 / np.abs(audio).max())).astype(np.float32)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    return audio if rate == ESPEAK_RATE else soxr.resample(audio, ESPEAK_RATE, rate, quality="VHQ")


def silence(seconds: float, rate: int = ESPEAK_RATE) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def pin_ogg_serial(data: bytes, serial: int = 0x50344D4D) -> bytes:
    """Rewrite every Ogg page's stream serial number (libsndfile picks a random one) and its CRC."""
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        assert out[pos : pos + 4] == b"OggS", "not an Ogg page"
        n_segments = out[pos + 26]
        body = sum(out[pos + 27 : pos + 27 + n_segments])
        end = pos + 27 + n_segments + body
        out[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22 : pos + 26] = b"\0\0\0\0"
        out[pos + 22 : pos + 26] = _ogg_crc(bytes(out[pos:end])).to_bytes(4, "little")
        pos = end
    return bytes(out)


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


@dataclass(frozen=True)
class Clip:
    id: str
    file: str
    text: str
    customer_segment: str


def make_audio_clips(folder: Path) -> list[Clip]:
    """Four short calls, one per container/rate: WAV 16 kHz, FLAC 44.1 kHz stereo, OGG 22.05 kHz, MP3 24 kHz."""
    folder.mkdir(parents=True, exist_ok=True)
    clips: list[Clip] = []

    text = "Thank you for calling Northwind Energy. My name is Dana. How can I help you today?"
    sf.write(folder / "call_0001.wav", resample(speak(text, "en-us"), 16000), 16000, subtype="PCM_16")
    clips.append(Clip("call_0001", "audio/call_0001.wav", text, "residential"))

    # Stereo call: agent on the left channel, customer on the right, taking turns.
    agent = "I can see your account. Your next bill is due on the fifth of March."
    customer = "Great, can I pay it by card today?"
    left = np.concatenate([speak(agent, "en-gb+f3"), silence(0.5)])
    right = speak(customer, "en-us+m3")
    length = len(left) + len(right)
    stereo = np.zeros((length, 2), dtype=np.float32)
    stereo[: len(left), 0] = left
    stereo[len(left) :, 1] = right
    sf.write(folder / "call_0002.flac", resample(stereo, 44100), 44100, subtype="PCM_16")
    clips.append(Clip("call_0002", "audio/call_0002.flac", f"{agent} {customer}", "business"))

    text = "Hi, I was charged twice for my internet bill this month, and I would like a refund."
    buffer = io.BytesIO()
    sf.write(buffer, resample(speak(text, "en-gb-scotland"), 22050), 22050, format="OGG", subtype="VORBIS")
    (folder / "call_0003.ogg").write_bytes(pin_ogg_serial(buffer.getvalue()))
    clips.append(Clip("call_0003", "audio/call_0003.ogg", text, "residential"))

    text = "Your refund of forty two dollars will reach your account within five working days."
    audio = resample(speak(text, "en-us+f2"), 24000)
    if "MP3" in sf.available_formats():
        sf.write(folder / "call_0004.mp3", audio, 24000, format="MP3", subtype="MPEG_LAYER_III")
        clips.append(Clip("call_0004", "audio/call_0004.mp3", text, "small_business"))
    else:  # libsndfile < 1.1 cannot write MP3: fall back to narrow-band WAV
        sf.write(folder / "call_0004.wav", resample(speak(text, "en-us+f2"), 8000), 8000, subtype="PCM_16")
        clips.append(Clip("call_0004", "audio/call_0004.wav", text, "small_business"))

    with open(folder / "transcripts.tsv", "w", encoding="utf-8", newline="") as f:
        f.write("file\ttext\n")
        for clip in clips:
            f.write(f"{Path(clip.file).name}\t{clip.text}\n")
    return clips


MEETING_SPEAKERS = {"Priya": "en-us+f3", "Tom": "en-gb", "Morag": "en-gb-scotland+f2", "Sam": "en-us+m3"}
MEETING_LINES = [
    ("Priya", "Good morning everyone, thanks for joining the weekly network operations meeting."),
    ("Priya", "We have three items today: the router upgrade, the outage report, and the budget."),
    ("Tom", "Let me start with the router upgrade. We replaced twelve of the sixteen core routers."),
    ("Tom", "The last four are scheduled for next Tuesday night, between midnight and four."),
    ("Morag", "Do we expect any customer impact during that window?"),
    ("Tom", "Only a few seconds of packet loss on each link while traffic fails over."),
    ("Sam", "Support will post a maintenance notice on the status page on Monday."),
    ("Priya", "Good. Morag, can you walk us through the outage report?"),
    ("Morag", "On Thursday a fibre cut near the river crossing took down the northern ring."),
    ("Morag", "Traffic rerouted in under a minute, but two business customers lost service for an hour."),
    ("Sam", "We received forty one calls about it, mostly from the industrial park."),
    ("Morag", "The repair crew spliced the fibre by six in the evening."),
    ("Priya", "What stops this from happening again?"),
    ("Morag", "We want a second path for those customers, through the new duct on Mill Road."),
    ("Tom", "That duct has spare capacity, so the cost is mostly labour."),
    ("Priya", "Please put a number on it before the budget review."),
    ("Sam", "On the budget, we are about six percent under plan for the quarter."),
    ("Sam", "Most of the saving comes from cheaper transit contracts we signed in January."),
    ("Priya", "Can part of that saving pay for the Mill Road path?"),
    ("Sam", "I think so, if the estimate stays under thirty thousand."),
    ("Tom", "I will get a quote from the contractor by Friday."),
    ("Morag", "I will add the customer impact to the report and send it to the account managers."),
    ("Priya", "One more thing: the new monitoring dashboards go live on the first of next month."),
    ("Tom", "Will the old alerts keep running in parallel for a while?"),
    ("Priya", "Yes, for two weeks, then we switch them off."),
    ("Sam", "Support would like a short training session before the switch."),
    ("Priya", "Good idea. Let us book one hour on Wednesday afternoon."),
    ("Tom", "Before we close, the spare parts stock is low for the older line cards."),
    ("Tom", "We have two spares left, and the supplier quotes eight weeks for new ones."),
    ("Morag", "Could we borrow cards from the lab racks until the order arrives?"),
    ("Tom", "Yes, the lab has three that passed testing last month."),
    ("Sam", "Please log the serial numbers so finance can track them."),
    ("Priya", "Agreed. Tom, raise the purchase order today, and Sam, update the asset register."),
    ("Morag", "Also, the security team asked us to rotate the router passwords this quarter."),
    ("Tom", "We can do that during the Tuesday maintenance window, while we are on the devices."),
    ("Priya", "That works. Morag, please confirm with security that Tuesday suits them."),
    ("Sam", "Last point from support: call volumes are down twelve percent since the new phone menu."),
    ("Priya", "That is good news. Let us keep an eye on it for another month."),
    ("Priya", "So, to recap: router upgrade on Tuesday, quote for Mill Road by Friday, training on Wednesday."),
    ("Priya", "Thanks everyone, see you next week."),
]
MEETING_PAUSES_S = [0.6, 1.1, 0.4, 0.9, 1.5, 0.7, 1.3, 0.5, 1.0, 0.8, 1.4, 0.45]


def make_meeting(folder: Path) -> tuple[str, float]:
    """About three minutes of four voices taking turns, 16 kHz mono FLAC, plus the true timings."""
    folder.mkdir(parents=True, exist_ok=True)
    rate = 16000
    parts: list[np.ndarray] = [silence(0.5, rate)]
    cursor = len(parts[0])
    segments = []
    for i, (speaker, text) in enumerate(MEETING_LINES):
        audio = resample(speak(text, MEETING_SPEAKERS[speaker]), rate)
        end = cursor + len(audio)
        segments.append({"start_s": cursor / rate, "end_s": end / rate, "speaker": speaker, "text": text})
        parts.append(audio)
        cursor += len(audio)
        pause = silence(MEETING_PAUSES_S[i % len(MEETING_PAUSES_S)], rate)
        parts.append(pause)
        cursor += len(pause)
    meeting = np.concatenate(parts)
    sf.write(folder / "meeting.flac", meeting, rate, subtype="PCM_16")
    with open(folder / "meeting.segments.json", "w", encoding="utf-8") as f:
        json.dump({"sample_rate": rate, "duration_s": len(meeting) / rate, "segments": segments}, f, indent=1)
        f.write("\n")
    return " ".join(text for _, text in MEETING_LINES), len(meeting) / rate


# ----------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    heading: str
    paragraphs: list[str]
    table: list[list[str]]  # first row: header

    def reference(self) -> str:
        """The page's true text as Markdown (what the OCR task is asked to produce)."""
        lines = [f"# {self.heading}", ""]
        for paragraph in self.paragraphs:
            lines += [paragraph, ""]
        header, *rows = self.table
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)


INVOICE = Page(
    heading="Northwind Energy - Invoice 2024-0815",
    paragraphs=[
        "Bill to: Harbour Bakery Ltd, 14 Quay Street, Portsmouth PO1 2AB. Account number 77120458.",
        "This invoice covers electricity and gas supplied between 1 July and 31 July 2024. "
        "Payment is due within 30 days of the invoice date by direct debit or bank transfer.",
        "Please quote the invoice number with every payment. Questions about this bill can be "
        "raised with customer support on 0800 123 4567, Monday to Friday, 8am to 6pm.",
    ],
    table=[
        ["Item", "Quantity", "Unit price", "Amount"],
        ["Electricity day rate", "1,240 kWh", "0.28", "347.20"],
        ["Electricity night rate", "610 kWh", "0.15", "91.50"],
        ["Gas", "2,015 kWh", "0.07", "141.05"],
        ["Standing charge", "31 days", "0.53", "16.43"],
        ["Total due", "", "", "596.18"],
    ],
)

MINUTES = Page(
    heading="Minutes of the Network Operations Meeting",
    paragraphs=[
        "Present: Priya Shah (chair), Tom Baker, Morag Reid, Sam Okafor. The meeting opened at 9:00.",
        "The router upgrade is three quarters done; the last four core routers will be replaced on "
        "Tuesday night. Customer impact is expected to be a few seconds of packet loss per link.",
        "The Thursday fibre cut at the river crossing left two business customers without service "
        "for one hour. A second path through the Mill Road duct is proposed.",
    ],
    table=[
        ["Action", "Owner", "Due"],
        ["Quote for Mill Road path", "Tom Baker", "Friday"],
        ["Outage report to account managers", "Morag Reid", "Monday"],
        ["Maintenance notice on status page", "Sam Okafor", "Monday"],
        ["Dashboard training session", "Priya Shah", "Wednesday"],
    ],
)


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        path = Path(folder) / name
        if path.exists():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def render_page(page: Page, size: tuple[int, int] = (1200, 1600)) -> Image.Image:
    """A plain business document: heading, wrapped paragraphs, a ruled table."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    margin, y = 100, 110
    width = size[0] - 2 * margin
    size = 44
    while size > 24 and draw.textlength(page.heading, font=_font(size, bold=True)) > width:
        size -= 2  # long headings shrink to fit the margins rather than run off the page
    draw.text((margin, y), page.heading, font=_font(size, bold=True), fill="black")
    y += 90
    body = _font(28)
    for paragraph in page.paragraphs:
        for line in _wrap(draw, paragraph, body, width):
            draw.text((margin, y), line, font=body, fill=(20, 20, 20))
            y += 40
        y += 28
    y += 20
    n_cols = len(page.table[0])
    first = 0.42 if n_cols == 4 else 0.5
    col_w = [int(width * first)] + [int(width * (1 - first) / (n_cols - 1))] * (n_cols - 1)
    col_w[-1] = width - sum(col_w[:-1])
    row_h = 58
    cell = _font(26)
    head = _font(26, bold=True)
    for r, row in enumerate(page.table):
        x = margin
        if r == 0:
            draw.rectangle([margin, y, margin + width, y + row_h], fill=(225, 230, 240))
        for c, text in enumerate(row):
            draw.rectangle([x, y, x + col_w[c], y + row_h], outline="black", width=2)
            draw.text((x + 14, y + 14), text, font=head if r == 0 else cell, fill="black")
            x += col_w[c]
        y += row_h
    return image


def make_documents(folder: Path) -> dict[str, str]:
    """PNG of both pages, a JPEG of the invoice, and a 2-page PDF (invoice then minutes)."""
    folder.mkdir(parents=True, exist_ok=True)
    invoice, minutes = render_page(INVOICE), render_page(MINUTES)
    invoice.save(folder / "invoice.png", optimize=True)
    minutes.save(folder / "minutes.png", optimize=True)
    invoice.save(folder / "invoice.jpg", quality=85)
    fixed = time.strptime("2024-08-15 12:00:00", "%Y-%m-%d %H:%M:%S")
    invoice.save(
        folder / "packet.pdf", save_all=True, append_images=[minutes], resolution=150.0,
        title="Northwind sample packet", creationDate=fixed, modDate=fixed,
    )
    return {"invoice": INVOICE.reference(), "minutes": MINUTES.reference()}


# ----------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


README = """# Sample inputs

Made by `make_samples.py` (espeak-ng speech, Pillow pages; deterministic). Regenerate with
`/work/venv/bin/python samples/make_samples.py` or `python samples/make_samples.py`.

| manifest | rows | what |
|---|---|---|
| `transcribe.csv` | 4 calls, 2-8 s | WAV 16 kHz, FLAC 44.1 kHz stereo (agent left, customer right), \
OGG/Vorbis 22.05 kHz, MP3 24 kHz; what each says also in `audio/transcripts.tsv` |
| `meetings.jsonl` | 1 meeting, ~3 min | `long/meeting.flac`, 16 kHz mono, four voices, 0.4-1.5 s pauses; \
true sentence timings and speakers in `long/meeting.segments.json` |
| `ocr.csv` | 4 documents | invoice and minutes as PNG, the invoice as JPEG, both as one 2-page PDF |

Conventions the readers rely on:

- **Relative uris resolve against the manifest's own folder**, not the current directory:
  `audio/call_0001.wav` in `samples/transcribe.csv` is `samples/audio/call_0001.wav`.
- `reference` holds the true text. For OCR it is Markdown (heading, paragraphs, a table); a multi-page
  document's pages are separated by a form feed (`\\f`), in page order. References in `ocr.csv` contain
  newlines inside quoted fields (valid CSV; pyarrow needs `ParseOptions(newlines_in_values=True)`).
- One pass-through column per manifest (`customer_segment`, `team`, `archive_box`) must come back
  unchanged on every result row.
"""


def main() -> None:
    clips = make_audio_clips(ROOT / "audio")
    write_csv(
        ROOT / "transcribe.csv",
        [
            {"id": c.id, "uri": c.file, "language": "en", "reference": c.text, "customer_segment": c.customer_segment}
            for c in clips
        ],
    )

    meeting_text, meeting_s = make_meeting(ROOT / "long")
    with open(ROOT / "meetings.jsonl", "w", encoding="utf-8") as f:
        row = {"id": "meeting_0001", "uri": "long/meeting.flac", "language": "en", "reference": meeting_text}
        f.write(json.dumps(row | {"team": "network-operations"}) + "\n")

    refs = make_documents(ROOT / "docs")
    packet = refs["invoice"] + PAGE_BREAK + refs["minutes"]
    documents = [
        ("doc_0001", "docs/invoice.png", refs["invoice"], "B-017"),
        ("doc_0002", "docs/minutes.png", refs["minutes"], "B-017"),
        ("doc_0003", "docs/invoice.jpg", refs["invoice"], "B-018"),
        ("doc_0004", "docs/packet.pdf", packet, "B-018"),
    ]
    write_csv(
        ROOT / "ocr.csv",
        [{"id": i, "uri": u, "reference": r, "archive_box": box} for i, u, r, box in documents],
    )
    (ROOT / "README.md").write_text(README, encoding="utf-8")

    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and p.suffix != ".py")
    print(f"meeting: {meeting_s:.1f} s; samples total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
