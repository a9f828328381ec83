"""Manifests whose parse is suspect are refused with the line, never run with rows silently missing;
the number of rows read is printed when a job starts."""
from __future__ import annotations

import pytest

from jobs.cli import main
from pipeline.io.manifest import read_manifest
from schemas.manifest import ManifestError

GOOD = "id,uri,language\na,a.wav,en\nb,b.wav,en\nc,c.wav,en\nd,d.wav,en\n"


def write(tmp_path, text: str, name: str = "m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unclosed_quote_is_refused_with_its_line(tmp_path):
    # pyarrow alone reads this as ONE row whose uri is the rest of the file
    path = write(tmp_path, 'id,uri\na,a.wav\nb,"b.wav\nc,c.wav\nd,d.wav\n')
    with pytest.raises(ManifestError) as err:
        read_manifest(str(path))
    assert str(err.value) == (f"{path}: line 3: a quoted field opened on line 3 is never closed; every row "
                              "after it would be lost, so the manifest is refused")


def test_quote_closed_rows_later_is_refused(tmp_path):
    # the stray quote on line 2 pairs with one two rows down: pyarrow makes one row of three
    path = write(tmp_path, 'id,uri,reference\na,a.wav,"hello ""x"" there\nb,b.wav,x\nc,c.wav,"y"\n')
    with pytest.raises(ManifestError, match=r"m\.csv: line 2: the record starting on line 2 has a quote that "
                                            r"does not close its field"):
        read_manifest(str(path))


def test_line_break_in_a_single_line_column_is_refused(tmp_path):
    path = write(tmp_path, 'id,uri,reference\na,"a.wav\nb.wav",fine\nc,c.wav,ok\n')
    with pytest.raises(ManifestError, match=r"line 2: column 'uri' holds a line break"):
        read_manifest(str(path))


def test_good_csv_keeps_every_row_and_multiline_references(tmp_path):
    assert read_manifest(str(write(tmp_path, GOOD))).num_rows == 4
    text = 'id,uri,reference\na,a.wav,"line one\nline two, with ""quotes"""\n\nb,b.wav,plain\n'
    table = read_manifest(str(write(tmp_path, text, "multi.csv")))
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("reference").to_pylist() == ['line one\nline two, with "quotes"', "plain"]
    crlf = read_manifest(str(write(tmp_path, GOOD.replace("\n", "\r\n"), "crlf.csv")))
    assert crlf.num_rows == 4
    long_reference = "word " * 40000  # 200 KB: over the csv module's default field limit
    table = read_manifest(str(write(tmp_path, f'id,uri,reference\na,a.wav,"{long_reference}"\n', "long.csv")))
    assert table.column("reference")[0].as_py() == long_reference


def test_rows_read_are_printed_and_a_bad_manifest_is_one_line(tmp_path, capsys):
    bad = write(tmp_path, 'id,uri\na,a.wav\nb,"b.wav\nc,c.wav\nd,d.wav\n')
    assert main(["transcribe", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"phi4mm: {bad}: line 3: a quoted field opened on line 3 is never closed; every row after "
                   "it would be lost, so the manifest is refused"]
    assert not (tmp_path / "out").exists()

    good = write(tmp_path, GOOD, "good.csv")
    # the processor check after the manifest read fails (no such model): the count is printed before it
    assert main(["transcribe", str(good), str(tmp_path / "out"), "--model", str(tmp_path / "no-model")]) == 2
    assert f"phi4mm: manifest {good}: 4 rows read" in capsys.readouterr().err


def test_json_lines_with_blank_lines_keep_every_row(tmp_path):
    path = write(tmp_path, '{"id": "a", "uri": "a.wav"}\n\n{"id": "b", "uri": "b.wav"}\n  \n', "m.jsonl")
    assert read_manifest(str(path)).column("id").to_pylist() == ["a", "b"]
