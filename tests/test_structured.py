"""`phi4mm prompt --schema`: constrained answers that validate, typed columns read back with pyarrow and
DuckDB, a bad schema refused before Ray, and the static decoder's constrained steps equal `generate`'s."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import read_output

SCHEMA = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": 24},
        "resolved": {"type": "boolean"},
        "mood": {"enum": ["happy", "neutral", "angry"]},
        "calls": {"type": "integer", "minimum": 0, "maximum": 9},
        "score": {"type": ["number", "null"]},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                     "required": ["name"]},
    },
    "required": ["reason", "resolved", "mood", "customer"],
}


@pytest.fixture(scope="module")
def schema_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("schema")
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    (folder / "job.yaml").write_text("prompt:\n  max_string_chars: 12\n")
    with open(folder / "calls.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"call{i}", "transcript": f"customer {i} asks about bill {i * 7}"}) + "\n")
        f.write(json.dumps({"id": "no_transcript"}) + "\n")  # the template's column missing: an error row
    out = folder / "out"
    assert run_job("prompt", folder / "calls.jsonl", out, "--schema", str(folder / "schema.json"),
                   "--prompt", "Extract the call's fields from: {transcript}", "--max-new-tokens", "160",
                   "--config", str(folder / "job.yaml")) == 0
    return out


def test_every_ok_answer_validates_and_has_typed_columns(schema_run):
    from jsonschema import validate

    table = read_output(schema_run)
    assert table.num_rows == 7 and sorted(table["id"].to_pylist()) == sorted([f"call{i}" for i in range(6)]
                                                                             + ["no_transcript"])
    types = {name: table.schema.field(name).type for name in ("reason", "resolved", "mood", "calls", "score")}
    assert types == {"reason": pa.string(), "resolved": pa.bool_(), "mood": pa.string(), "calls": pa.int64(),
                     "score": pa.float64()}
    assert "customer" not in table.column_names  # an object: only in `json`
    rows = table.to_pandas().set_index("id")
    ok = rows[rows.status == "ok"]
    assert len(ok) >= 5, rows.error.to_dict()  # the tiny model's noise, constrained, still answers
    for rid, row in ok.iterrows():
        answer = json.loads(row.json)
        validate(answer, SCHEMA)
        assert row.reason == answer["reason"] and row.mood == answer["mood"] and row.resolved == answer["resolved"]
        assert (pd_null(row.calls) and "calls" not in answer) or row.calls == answer.get("calls")
    bad = rows.loc["no_transcript"]
    assert bad.status == "error" and "transcript" in bad.error and pd_null(bad.json)


def pd_null(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def test_typed_columns_in_duckdb(schema_run):
    import duckdb

    glob = str(schema_run / "task=prompt" / "*.parquet")
    con = duckdb.connect()
    kinds = dict(con.execute(f"select column_name, column_type from (describe select * from read_parquet('{glob}'))"
                             ).fetchall())
    assert (kinds["reason"], kinds["resolved"], kinds["mood"], kinds["calls"], kinds["score"]) == \
        ("VARCHAR", "BOOLEAN", "VARCHAR", "BIGINT", "DOUBLE")
    moods = con.execute(f"select distinct mood from read_parquet('{glob}') where status = 'ok'").fetchall()
    assert {m for (m,) in moods} <= {"happy", "neutral", "angry"}
    nested = con.execute(f"select count(*) from read_parquet('{glob}') where status = 'ok' "
                         "and json_extract_string(json, '$.customer.name') is not null").fetchone()[0]
    assert nested >= 5


def test_invalid_schema_is_refused_before_ray(tmp_path, tiny_model, capsys):
    from jobs.cli import main

    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    (tmp_path / "bad.json").write_text(json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}))
    (tmp_path / "list.json").write_text(json.dumps({"type": "array"}))
    for name, said in (("bad.json", "'strin' is not valid"), ("list.json", "an object at the top")):
        rc = main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--model", tiny_model,
                   "--schema", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and "--schema" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_static_decoder_constrained_steps_equal_generate(tiny_model):
    """The grammar in the static decoder (masks between the logits and the pick), serial or pipelined
    (actors/grammar_pipeline.py), gives generate's tokens."""
    from actors.engine import Phi4MMEngine
    from actors.grammar import json_schema_grammar
    from jsonschema import validate
    from pipeline.model.inputs import InputBuilder
    from schemas.config import BatchingConfig, ModelConfig
    from schemas.structured import generation_schema

    builder = InputBuilder(tiny_model)
    items = [builder.text(f"Extract the fields of call {i}: " + "words " * i) for i in range(4)]
    grammar = json_schema_grammar(generation_schema(SCHEMA, 12, 8))
    runs = {}
    for mode, pipeline in (("static", "off"), ("static", "on"), ("generate", "auto")):
        engine = Phi4MMEngine(tiny_model, "text", ModelConfig(source=tiny_model),
                              BatchingConfig(decoder=mode, decode_slots=2, check_every=3, grammar_pipeline=pipeline))
        gens = engine.generate([it.inputs for it in items], [it.batch_key for it in items], [160] * 4,
                               grammars=[grammar, grammar, None, grammar])
        runs[mode, pipeline] = [g.token_ids for g in gens]
        for i in (0, 1, 3):
            validate(json.loads(gens[i].text), SCHEMA)
    assert runs["static", "off"] == runs["static", "on"] == runs["generate", "auto"]
