"""Manifest columns and values that used to cost more than themselves.

- a pass-through column named like a work-row column (`modality`, `chunk_text`) comes back unchanged,
  with its own type, and the work row's own column is untouched (they live in separate namespaces);
- a column named like a result column the pipeline fills (`status`, `text`, `task`, `error`) is
  refused before Ray starts, with a message naming it;
- an unknown `target_language` in one row costs that row's translation only (an error row naming
  the code), not its asr or summary rows, and is reported on the driver.

Every "nothing lost" is a row count.
"""
from __future__ import annotations

import logging

import pandas as pd
import pyarrow as pa
import pytest

from schemas.manifest import RESERVED_COLUMNS, ManifestError, unknown_target_languages, validate_manifest
from tests.conftest import read_output

MAX_NEW = "6"


@pytest.mark.parametrize("names", [["status"], ["text", "task"], ["error"], ["page", "model", "run_id"]])
def test_result_column_names_are_refused_naming_them(names):
    table = pa.table({"id": ["a"], "uri": ["a.wav"], **{n: ["x"] for n in names}})
    with pytest.raises(ManifestError) as err:
        validate_manifest(table)
    for name in names:
        assert repr(name) in str(err.value)
    assert "rename" in str(err.value)


def test_known_columns_that_are_result_columns_stay_accepted():
    out = validate_manifest(pa.table({"id": ["a"], "uri": ["a.wav"], "language": ["en"],
                                      "target_language": ["fr"], "modality": [3], "chunk_text": ["t"]}))
    assert out["target_language"].to_pylist() == ["fr"] and out["modality"].to_pylist() == [3]
    assert not {"id", "language", "target_language", "uri", "data"} & set(RESERVED_COLUMNS)


def test_unknown_target_languages_found_per_code():
    table = validate_manifest(pa.table({"id": ["a", "b", "c", "d"], "uri": ["x"] * 4,
                                        "target_language": ["../../etc", "FR", None, "../../etc"]}))
    assert unknown_target_languages(table) == {"../../etc": ["a", "d"]}


@pytest.mark.slow
def test_colliding_pass_through_and_bad_target_language_cost_only_their_own_outputs(
        run_job, samples_copy, caplog):
    calls = pd.read_csv(samples_copy / "transcribe.csv").head(3)
    calls["modality"] = [7, 8, 9]  # an int column named like the work row's `modality`
    calls["chunk_text"] = ["c1", "c2", "c3"]  # and one named like a work-row list column
    calls["target_language"] = [None, "../../etc", None]
    manifest = samples_copy / "collide.csv"
    calls.to_csv(manifest, index=False)
    out = samples_copy.parent / "out"
    with caplog.at_level(logging.WARNING, logger="jobs.runner"):
        rc = run_job("transcribe", manifest, out, "--translate-to", "fr", "--summarize",
                     "--max-new-tokens", MAX_NEW, "--run-id", "collide")
    assert rc == 0
    assert "'../../etc'" in caplog.text and "call_0002" in caplog.text  # said on the driver, before Ray

    rows = read_output(out).to_pandas()
    # asr + translate (the job's fr, or the row's own target) + summarize for each of the 3 inputs
    assert len(rows) == 3 * 3 and not rows.duplicated(["id", "task", "target_language", "page"]).any()
    by_key = rows.set_index(["id", "task"])
    bad = by_key.loc[("call_0002", "translate")]
    assert bad.status == "error" and "'../../etc'" in bad.error and "target_language" in bad.error
    assert bad.target_language == "../../etc"
    others = rows.drop(index=rows[(rows.id == "call_0002") & (rows.task == "translate")].index)
    assert (others.status == "ok").all(), others[others.status != "ok"][["id", "task", "error"]]
    assert len(others) == 8  # call_0002's asr and summary are there, and ok
    # the pass-through columns come back unchanged, with their own types, on every row
    assert rows.modality.dtype.kind == "i"
    want = calls.set_index("id")
    assert (rows.modality.values == want.modality[rows.id].values).all()
    assert (rows.chunk_text.values == want.chunk_text[rows.id].values).all()
    assert set(rows.columns) >= {"modality", "chunk_text", "customer_segment"}
    assert not [c for c in rows.columns if c.startswith("manifest:")]


def test_result_column_in_the_manifest_fails_before_ray_with_one_line(run_job, samples_copy, capsys):
    calls = pd.read_csv(samples_copy / "transcribe.csv").head(1)
    calls["status"] = "vip"
    manifest = samples_copy / "status.csv"
    calls.to_csv(manifest, index=False)
    out = samples_copy.parent / "out"
    assert run_job("transcribe", manifest, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("phi4mm: ") and "'status'" in err[0]
    assert not out.exists()
