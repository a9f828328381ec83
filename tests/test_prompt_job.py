"""`phi4mm prompt` through real Ray on the tiny model: every mix of media gives its row, and the text
equals the model card's one-at-a-time recipe on the same weights (tests/test_fidelity.py's comparison)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image

from tests.conftest import MAX_NEW, read_output
from tests.test_fidelity import assert_same_or_tie

MAX = int(MAX_NEW)
DYNAMIC_HD = 2  # few crops per image: the tiny model's vision tower is the slow part on CPU


def make_video(path: Path, seconds: float = 3.0, fps: int = 4, size=(96, 64)) -> None:
    """A short MPEG-4 clip whose frames change colour, written with PyAV."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            pixels = np.full((size[1], size[0], 3), (40 * i) % 255, dtype=np.uint8)
            pixels[:, : size[0] // 2, 1] = 200 - 10 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make_media(folder: Path) -> None:
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate([(300, 200), (520, 400), (200, 300)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    for i, seconds in enumerate([2.0, 3.0]):
        sf.write(folder / f"a{i}.wav", (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    make_video(folder / "clip.mp4")


# id -> (manifest row, what the prompt holds: images, audios)
ROWS = {
    "text": {"prompt": "Tell me about cats."},
    "one_image": {"uri": "img0.png", "prompt": "Describe the image."},
    "three_images": {"images": ["img0.png", "img1.png", "img2.png"], "prompt": "Compare the three images."},
    "audio_only": {"audio": "a0.wav", "prompt": "What is the speaker asking?"},
    "spoken_query": {"audio": ["a1.wav"]},  # no prompt text: the audio is the question
    "image_audio": {"images": ["img1.png"], "audio": "a0.wav"},  # the card's vision+speech query
    "video": {"video": "clip.mp4", "prompt": "What happens in this clip?"},
}
BAD = {
    "missing_image": {"images": ["img0.png", "nowhere.png"], "prompt": "Compare."},
    "no_prompt": {"images": ["img0.png"]},  # an image and no question at all
}


@pytest.fixture(scope="module")
def prompt_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt")
    make_media(folder)
    manifest = folder / "prompts.jsonl"
    with open(manifest, "w") as f:
        for rid, row in {**ROWS, **BAD}.items():
            f.write(json.dumps({"id": rid, **row, "call_centre": "north"}) + "\n")
    out = folder / "out"
    rc = run_job("prompt", manifest, out, "--max-new-tokens", MAX_NEW, "--dynamic-hd", str(DYNAMIC_HD),
                 "--run-id", "e2e-prompt")
    assert rc == 0
    return folder, out


def test_every_mix_gives_its_row(prompt_run):
    folder, out = prompt_run
    table = read_output(out)
    rows = table.to_pandas().set_index("id")
    assert sorted(rows.index) == sorted({**ROWS, **BAD})  # one row per input, none lost, none twice
    assert set(rows.task) == {"prompt"} and set(rows.page) == {1}
    assert (out / "task=prompt").is_dir()
    ok = rows.loc[list(ROWS)]
    assert (ok.status == "ok").all(), ok[ok.status != "ok"].error.to_dict()
    assert ok.text.str.len().gt(0).all() and ok.output_tokens.gt(0).all()
    assert (rows.call_centre == "north").all()  # passed through
    # more media, more prompt tokens: three images over one, audio rows know their length
    assert ok.loc["three_images", "input_tokens"] > ok.loc["one_image", "input_tokens"]
    assert ok.loc["audio_only", "duration_s"] == pytest.approx(2.0)
    assert ok.loc["spoken_query", "duration_s"] == pytest.approx(3.0)
    assert rows.loc["missing_image", "status"] == "error" and "nowhere.png" in rows.loc["missing_image", "error"]
    assert rows.loc["no_prompt", "status"] == "error" and "no prompt" in rows.loc["no_prompt", "error"]
    record = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert record["counts"]["prompt"] == {"ok": len(ROWS), "error": len(BAD)}


@pytest.fixture(scope="module")
def engines(tiny_model):
    from actors.engine import Phi4MMEngine
    from schemas.config import BatchingConfig, ModelConfig

    return {m: Phi4MMEngine(tiny_model, m, ModelConfig(source=tiny_model), BatchingConfig())
            for m in ("speech", "vision", "text")}


def test_every_mix_matches_card_recipe(prompt_run, engines, tiny_model):
    from bench.card_recipe import CardRecipe
    from pipeline.media.audio import decode_audio
    from pipeline.media.pages import decode_pages
    from pipeline.model.inputs import InputBuilder
    from pipeline.stages.prepare_prompts import prompt_modality
    from pipeline.media.video import sample_frames

    folder, out = prompt_run
    rows = read_output(out).to_pandas().set_index("id")
    card = CardRecipe(tiny_model)
    builder = InputBuilder(tiny_model, dynamic_hd=DYNAMIC_HD)
    stats = {"equal": 0, "ties": 0}
    for rid, row in ROWS.items():
        images = [decode_pages((folder / u).read_bytes(), u)[0]
                  for u in ([row["uri"]] if "uri" in row else row.get("images", []))]
        if "video" in row:
            images += sample_frames((folder / row["video"]).read_bytes(), row["video"])
        audio = row.get("audio", [])
        audios = [decode_audio((folder / u).read_bytes(), u) for u in ([audio] if isinstance(audio, str) else audio)]
        if rid == "video":
            assert len(images) == 3  # 3 s at 1 frame per second
        ref = card.prompt(images, audios, row.get("prompt"), MAX, want_logits=True, dynamic_hd=DYNAMIC_HD)
        built = builder.prompt_item(images, audios, row.get("prompt"))
        assert_same_or_tie(rows.loc[rid, "text"], ref, engines[prompt_modality(len(images), len(audios))],
                           built.inputs, rid, stats)
    assert stats["equal"] >= len(ROWS) - 1, stats


def test_template_fills_columns_and_a_missing_one_is_an_error_row(tiny_model):
    """The --prompt template's {column}s come from the row; a row without one is an error row naming it
    (the stage on a hand-made table: one row out per row in)."""
    from pipeline.stages.prepare_prompts import PreparePrompts
    from pipeline.context import RunContext
    from schemas.config import JobConfig

    def run(template: str, table: pa.Table) -> list[dict]:
        config = JobConfig(job="prompt", input="x", output="y", model={"source": tiny_model},
                           prompt={"template": template})
        return PreparePrompts(RunContext.for_tests(config))(table).to_pylist()

    table = pa.table({"id": ["a", "b", "c"], "uri": pa.nulls(3, pa.string()), "data": pa.nulls(3, pa.binary()),
                      "topic": ["cats", None, "dogs"], "prompt": [None, None, "Own prompt wins."]})
    rows = run("Write about {topic}.", table)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert "'topic'" in rows[1]["error"] and rows[0]["modality"] == "text"
    from pipeline.model.inputs import load_processor
    from schemas.work_rows import decode_item

    tokenizer = load_processor(tiny_model).tokenizer
    said = [tokenizer.decode(decode_item(r["chunk_inputs"][0])["input_ids"]) for r in (rows[0], rows[2])]
    assert "Write about cats." in said[0] and "Own prompt wins." in said[1]
    missing = run("Write about {customer_mood}.", table)
    assert len(missing) == 3
    assert all("no column 'customer_mood'" in r["error"] for r in missing if r["id"] != "c")
    assert missing[2]["error"] is None  # c has its own prompt
