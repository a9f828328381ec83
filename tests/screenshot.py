"""Look at an HTML page as a person would: headless Chromium renders it to PNG."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(page: Path, out_dir: Path, size: tuple[int, int]) -> Path:
    """Render `page` to a PNG of `size`, and check it is a real picture, not a blank page.

    Skips (with the reason) only where no Chromium is installed; CI installs it (scripts/test.sh).
    """
    from PIL import Image

    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                     if shutil.which(n)), None)
    if chromium is None:
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium); HTML checked, screenshot not taken")
    shot = out_dir / "report.png"
    subprocess.run([chromium, *FLAGS, f"--user-data-dir={out_dir / 'profile'}", f"--screenshot={shot}",
                    f"--window-size={size[0]},{size[1]}", page.as_uri()],
                   check=True, timeout=60, capture_output=True)
    with Image.open(shot) as png:
        assert png.format == "PNG" and png.size == size
        colours = png.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
    return shot
