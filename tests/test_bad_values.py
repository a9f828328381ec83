"""Manifest columns and values that used to cost more than themselves.

- a pass-through column named like a work-row column (`modality`, `chunk_text`) comes back unchanged,
  with its own type, and the work row's own column is untouched (they live in separate namespaces);
- a column named like a result column the pipeline fills (`status`, `text`, `task`, `error`) is
  refused before Ray starts, with a message naming it;
- an unknown `target_language` in one row costs that row's translation only (an error row naming
  the code), not its asr or summary rows, and is reported on the driver.

The run that shows the pass-through and target-language rows end to end, with row counts, is
tests/test_output_faults.py::test_s3_run_keeps_every_row_and_reads_in_every_reader (one job for both,
to keep the suite short).
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from schemas.manifest import RESERVED_COLUMNS, ManifestError, unknown_target_languages, validate_manifest


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


def test_prepare_makes_only_the_translation_of_a_bad_target_an_error_row(tiny_model):
    from pipeline.stages.prepare_audio import PrepareAudio
    from pipeline.context import RunContext
    from schemas.config import JobConfig
    from tests.conftest import SAMPLES

    clip = (SAMPLES / "audio" / "call_0001.wav").read_bytes()
    table = validate_manifest(pa.Table.from_pylist([
        {"id": "odd", "data": clip, "target_language": "../../etc", "modality": 3},
        {"id": "plain", "data": clip, "modality": 4},
    ]))
    config = JobConfig(job="transcribe", input="m.csv", output="out", translate_to=["fr"], summarize=True,
                       model={"source": tiny_model})
    out = PrepareAudio(RunContext.for_tests(config))(table).to_pylist()
    rows = {(r["id"], r["task"], r["target_language"]): r for r in out}
    # the summary is made later from the asr row, which is a normal speech row here
    assert sorted(rows) == [("odd", "asr", None), ("odd", "translate", "../../etc"),
                            ("plain", "asr", None), ("plain", "translate", "fr")]
    bad = rows[("odd", "translate", "../../etc")]
    assert bad["modality"] == "none" and "'../../etc'" in bad["error"] and bad["error"].startswith("id odd:")
    for key in (("odd", "asr", None), ("plain", "asr", None), ("plain", "translate", "fr")):
        assert rows[key]["error"] is None and rows[key]["modality"] == "speech" and rows[key]["chunk_inputs"]
    # the manifest's own `modality` rides along under its prefix; the work row's is untouched
    assert [r["manifest:modality"] for r in out] == [3, 3, 4, 4]
