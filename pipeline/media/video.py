"""Video frames for a prompt: decoded with PyAV, sampled at a fixed rate, bounded in count and size.

The model takes a video as a series of images (the card's multi-image / video-clip summarisation), so a
clip becomes at most `max_frames` RGB frames, one every 1/fps seconds (evenly spread over the clip when
that would be more), each shrunk to fit `max_side` pixels so the prompt fits the model's context.
"""
from __future__ import annotations

import io

from PIL import Image

from pipeline.core.errors import InputError


def sample_frames(data: bytes, source: str, *, fps: float = 1.0, max_frames: int = 64, max_side: int = 448,
                  max_pixels: int = 40_000_000) -> list[Image.Image]:
    """Frames at `fps` (the first at 0 s), at most `max_frames`; InputError for bytes PyAV cannot decode,
    a file with no video stream, frames over `max_pixels`, or no frame at all."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise InputError.about(source, f"cannot decode video ({exc})") from None
    with container:
        if not container.streams.video:
            raise InputError.about(source, "has no video stream")
        stream = container.streams.video[0]
        duration = _duration_s(container, stream)
        step = 1.0 / fps
        if duration is not None and duration / step > max_frames:
            step = duration / max_frames  # a long clip: max_frames spread evenly over it
        frames: list[Image.Image] = []
        next_t = 0.0
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else next_t
                if t + 1e-6 < next_t:
                    continue
                if frame.width * frame.height > max_pixels:
                    raise InputError.about(source, f"video frames of {frame.width}x{frame.height} pixels are over "
                                                   f"the limit of {max_pixels}")
                image = frame.to_image()
                image.thumbnail((max_side, max_side))
                frames.append(image.convert("RGB"))
                next_t += step
                while next_t <= t:
                    next_t += step
                if len(frames) >= max_frames:
                    break
        except av.FFmpegError as exc:
            if not frames:
                raise InputError.about(source, f"cannot decode video ({exc})") from None
    if not frames:
        raise InputError.about(source, "the video has no frames")
    return frames


def _duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None
