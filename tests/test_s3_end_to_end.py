"""A transcribe job whose manifest, media, model and output all live on S3 (a local moto server).

This is the nightly job's real shape: `phi4mm transcribe s3://calls-in/... s3://results/... --model s3://...`,
run here in-process on the session's Ray (whose workers got the fake AWS credentials at start, see
tests/conftest.py). The output is read back from S3 with pyarrow, as an analyst would.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from pipeline.model.source import COMPLETE_MARKER
from pipeline.io.storage import pyarrow_filesystem
from tests.conftest import SAMPLES
from schemas.results import KEY_COLUMNS

MODEL_URI = "s3://models/tiny/"
MAX_NEW = "8"
KEY = list(KEY_COLUMNS)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """Where `--model s3://...` is copied: shared by the tests of this module, like a node's disk."""
    return tmp_path_factory.mktemp("model-cache")


def _job_yaml(tmp_path: Path, cache: Path) -> str:
    """`--config` with the copy's cache folder (JobConfig.model.cache_dir), which travels to the workers
    inside the config. PHI4MM_CACHE would work too, but only when set before Ray starts its workers."""
    path = tmp_path / "job.yaml"
    path.write_text(f"model:\n  cache_dir: {cache}\n")
    return str(path)


def _upload_model(s3, tiny_model: str) -> list[str]:
    names = []
    for f in sorted(Path(tiny_model).rglob("*")):
        if f.is_file():
            rel = f.relative_to(tiny_model).as_posix()
            s3.put("models", f"tiny/{rel}", f.read_bytes())
            names.append(rel)
    return names


def _upload_audio(s3) -> None:
    for f in sorted((SAMPLES / "audio").iterdir()):
        s3.put("calls-in", f"audio/{f.name}", f.read_bytes())


def _read_s3_output(s3, uri: str) -> pd.DataFrame:
    fs, path = pyarrow_filesystem(uri, s3.options)
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                           ignore_prefixes=["_", "."])
    return dataset.to_table().to_pandas()


def _checkpoints(cache: Path) -> dict[str, dict]:
    """{folder name: marker content} of the finished copies under the cache root; fails on leftovers."""
    root = cache  # JobConfig.model.cache_dir is the root itself (PHI4MM_CACHE gets a models/ below it)
    entries = sorted(os.listdir(root))
    assert not [e for e in entries if ".tmp-" in e], f"staging folders left behind: {entries}"
    folders = [e for e in entries if (root / e).is_dir()]
    assert all((root / f / COMPLETE_MARKER).exists() for f in folders), entries
    return {f: json.loads((root / f / COMPLETE_MARKER).read_text()) for f in folders}


def _marker_stat(cache: Path) -> tuple[int, int] | None:
    markers = [m for m in cache.glob(f"*/{COMPLETE_MARKER}") if not m.parent.name.endswith("-processor")]
    if not markers:
        return None
    st = markers[0].stat()
    return st.st_ino, st.st_mtime_ns


@pytest.mark.realsize  # a whole job on S3 (26 s); the fast tier keeps the S3 readers' and fetches' unit tests
def test_manifest_media_model_and_output_all_on_s3(s3, run_job, tiny_model, model_cache, tmp_path):
    model_files = _upload_model(s3, tiny_model)
    _upload_audio(s3)
    calls = pd.read_csv(SAMPLES / "transcribe.csv")
    # relative uris resolve against the manifest's own prefix (s3://calls-in/); absolute s3:// uris too
    calls.loc[calls.id.isin(["call_0003", "call_0004"]), "uri"] = "s3://calls-in/" + calls.uri
    missing = {"id": "call_missing", "uri": "audio/call_9999.wav", "language": "en",
               "reference": None, "customer_segment": "residential"}
    manifest = pd.concat([calls, pd.DataFrame([missing])], ignore_index=True)
    s3.put("calls-in", "manifest.csv", manifest.to_csv(index=False).encode())
    s3.create_bucket("results")

    rc = run_job("transcribe", "s3://calls-in/manifest.csv", "s3://results/run/", "--s3-endpoint", s3.endpoint_url,
                 "--max-new-tokens", MAX_NEW, "--run-id", "s3-manifest", "--config", _job_yaml(tmp_path, model_cache),
                 model=MODEL_URI)
    assert rc == 0

    # everything the job wrote is on S3, under the output prefix, and reads back as a dataset
    keys = s3.keys("results")
    assert "run/_runs/s3-manifest.json" in keys
    assert any(k.startswith("run/task=asr/") and k.endswith(".parquet") for k in keys), keys
    rows = _read_s3_output(s3, "s3://results/run/")
    assert len(rows) == len(manifest) and set(rows.task) == {"asr"}
    assert not rows.duplicated(KEY).any()
    by_id = rows.set_index("id")
    good = by_id.loc[calls.id]
    assert (good.status == "ok").all(), good.error.to_dict()
    assert good.text.str.len().gt(0).all() and (good.output_tokens > 0).all()
    assert good.uri.str.startswith("s3://calls-in/audio/").all()  # relative uris came back resolved
    assert (good.customer_segment == calls.set_index("id").customer_segment).all()
    assert (by_id.model == MODEL_URI).all() and (by_id.run_id == "s3-manifest").all()
    bad = by_id.loc["call_missing"]
    assert bad.status == "error" and "s3://calls-in/audio/call_9999.wav" in bad.error and "not found" in bad.error

    record = json.loads(s3.get("results", "run/_runs/s3-manifest.json"))
    assert record["counts"] == {"asr": {"ok": len(calls), "error": 1}}
    assert record["audio_s"] > 0

    # the report reads the same dataset straight from S3
    from jobs.report import main as report_main

    summary = tmp_path / "report.json"
    assert report_main(["s3://results/run/", "--s3-endpoint", s3.endpoint_url, "--json", str(summary)]) == 0
    assert json.loads(summary.read_text())["rows"] == len(calls) + 1

    # the checkpoint was copied from S3 once, completely, into the configured cache; the CPU stages
    # and the driver took only the processor files (no weights, no adapters)
    copies = _checkpoints(model_cache)
    full = {k: v for k, v in copies.items() if not k.endswith("-processor")}
    processor = {k: v for k, v in copies.items() if k.endswith("-processor")}
    assert len(full) == 1 and len(processor) == 1, sorted(copies)
    (marker,) = full.values()
    assert marker["uri"] == MODEL_URI.rstrip("/") and sorted(marker["files"]) == model_files
    (light,) = processor.values()
    assert "tokenizer.json" in light["files"] and "config.json" in light["files"]
    assert not [f for f in light["files"] if f.endswith(".safetensors") or "/" in f], light["files"]


@pytest.mark.realsize  # a whole job over an S3 media prefix (the listing itself: tests/test_storage_s3.py, fast tier)
def test_media_prefix_as_manifest(s3, run_job, tiny_model, model_cache, tmp_path):
    """`s3://calls-in/audio/` with suffix filters: every matching object is an input, its key the id."""
    before = _marker_stat(model_cache)  # set when the test above ran first: the copy must be reused
    _upload_model(s3, tiny_model)
    _upload_audio(s3)
    s3.create_bucket("results")

    rc = run_job("transcribe", "s3://calls-in/audio/", "s3://results/prefix", "--suffix", ".wav", "--suffix", ".flac",
                 "--s3-endpoint", s3.endpoint_url, "--max-new-tokens", MAX_NEW, "--run-id", "s3-prefix",
                 "--config", _job_yaml(tmp_path, model_cache), model=MODEL_URI)
    assert rc == 0

    rows = _read_s3_output(s3, "s3://results/prefix")
    # .ogg, .mp3 and transcripts.tsv are filtered out by the suffixes
    assert sorted(rows.id) == ["audio/call_0001.wav", "audio/call_0002.flac"]
    assert (rows.status == "ok").all(), rows.error.tolist()
    assert sorted(rows.uri) == ["s3://calls-in/audio/call_0001.wav", "s3://calls-in/audio/call_0002.flac"]
    assert rows.size_bytes.tolist() == [(SAMPLES / r).stat().st_size for r in rows.id]
    record = json.loads(s3.get("results", "prefix/_runs/s3-prefix.json"))
    assert record["counts"] == {"asr": {"ok": 2, "error": 0}}

    assert len([k for k in _checkpoints(model_cache) if not k.endswith("-processor")]) == 1
    after = _marker_stat(model_cache)
    assert after is not None
    if before is not None:
        assert after == before, "the cached checkpoint was copied again"
