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


# -- what no schema can do: crash, run on, or be refused only after Ray started ------------------------

def grammar_accepts(tiny_model):
    """accepts(schema, text): whether the grammar the GPU stages compile for `schema` (bounded as they
    bound it) lets a model write `text`, token by token, to the end."""
    import llguidance
    import llguidance.hf

    from actors.grammar import json_schema_grammar
    from pipeline.model.inputs import load_processor
    from schemas.structured import generation_schema

    tokenizer = load_processor(tiny_model).tokenizer
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=tokenizer.eos_token_id)

    def accepts(schema: dict, text: str) -> bool:
        matcher = llguidance.LLMatcher(ll, json_schema_grammar(generation_schema(schema, 12, 3, 6)))
        assert not matcher.is_error(), matcher.get_error()
        ids = tokenizer.encode(text, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    return accepts


def test_the_grammar_keeps_integers_in_int64_and_numbers_short(tiny_model):
    accepts = grammar_accepts(tiny_model)
    schema = {"type": "object", "required": ["n", "x", "any", "rows"], "properties": {
        "n": {"type": "integer", "minimum": 0}, "x": {"type": "number"}, "any": {},
        "rows": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer"}}}}}}

    def answer(n="9000000000000000000", x="2.5", any_='{"a":[1,"b",null]}', rows='[{"k":-3}]') -> str:
        return f'{{"n":{n},"x":{x},"any":{any_},"rows":{rows}}}'

    assert accepts(schema, answer())
    assert accepts(schema, answer(x="-999999999999999.123456", any_="null"))
    for text in (answer(n="9223372036854775808"),  # 2**63: past int64
                 answer(n="100000000000000000000000000000"),
                 answer(x="2.7299999999998058"),  # more than 6 decimals: a run of digits
                 answer(x="1e400"), answer(x="10000000000000000"),  # an exponent; past 1e15
                 answer(any_='{"a":1.1234567}'), answer(any_='"a string of 13"'),  # nested values bounded too
                 answer(any_='[1,2,3,4]'), answer(rows='[{"k":1},{"k":2},{"k":3},{"k":4}]'),  # arrays: 3 items
                 answer(rows='[{"k":1,"extra":2}]')):  # objects that name properties take no others
        assert not accepts(schema, text), text


@pytest.mark.parametrize("prop, keyword", [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, '"uniqueItems" at properties/tags'),
    ({"not": {"type": "string"}}, '"not" at properties/tags'),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, '"if" at properties/tags'),
    ({"type": "array", "contains": {"type": "integer"}}, '"contains" at properties/tags'),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, '"propertyNames" at properties/tags'),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 2},  # (1: llguidance enforces it)
     '"minProperties" at properties/tags'),
    ({"type": "string", "format": "shoe-size"}, '"format" at properties/tags'),
    ({"type": "string", "pattern": "^(?=a)a+$"}, '"pattern" at properties/tags'),
    ({"$ref": "#/$defs/nowhere"}, '"$ref" at properties/tags'),
    ({"enum": []}, '"required" at the top (property "tags"): no answer satisfies it'),
    ({"type": "integer", "minimum": 10, "maximum": 1}, '"required" at the top (property "tags"): no answer'),
    ({"type": "integer", "enum": [10**30]}, '"enum" at properties/tags'),
])
def test_a_schema_the_grammar_cannot_enforce_is_refused_before_ray(prop, keyword, tmp_path, capsys, monkeypatch):
    import ray

    from jobs.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"tags": prop}, "required": ["tags"]}))
    assert main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--schema", str(schema)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"phi4mm: --schema {schema}: {keyword}"), lines


def test_extract_schemas_get_the_same_check(tmp_path, capsys, monkeypatch):
    import ray

    from jobs.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "calls.csv").write_text("id,uri\nc1,/nowhere.wav\n")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"": {"type": "string"}}}))
    assert main(["transcribe", str(tmp_path / "calls.csv"), str(tmp_path / "out"), "--extract", str(schema)]) == 2
    assert capsys.readouterr().err.startswith(f'phi4mm: --extract {schema}: a property named "" (at properties)')
    schema.write_text(json.dumps({"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}))
    assert main(["transcribe", str(tmp_path / "calls.csv"), str(tmp_path / "out"), "--extract", str(schema)]) == 2
    assert capsys.readouterr().err.startswith(f'phi4mm: --extract {schema}: "uniqueItems" at properties/t: the '
                                              "grammar engine cannot enforce it")


# A schema that drives the tiny model into every kind of value: integers that only come huge, numbers,
# nested objects, arrays of objects, nulls, and a property named like a manifest column (`uri`) that this
# manifest does not have
EDGES = {
    "type": "object",
    "properties": {
        "uri": {"type": "string", "maxLength": 6},
        "big": {"type": "integer", "minimum": 10**17},
        "ratio": {"type": "number"},
        "maybe": {"type": ["integer", "null"]},
        "nothing": {"type": "null"},
        "owner": {"type": "object", "required": ["name", "tags"], "properties": {
            "name": {"type": "string", "maxLength": 5},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}}},
        "lines": {"type": "array", "maxItems": 2, "items": {"type": "object", "required": ["sku", "qty"],
                                                            "properties": {"sku": {"type": "string", "maxLength": 3},
                                                                           "qty": {"type": "integer"}}}},
    },
    "required": ["uri", "big", "ratio", "maybe", "nothing", "owner", "lines"],
}
EDGE_IDS = [f"order{i}" for i in range(4)]


@pytest.fixture(scope="module")
def edges_run(run_job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edges")
    (folder / "schema.json").write_text(json.dumps(EDGES))
    with open(folder / "orders.jsonl", "w") as f:
        for i, rid in enumerate(EDGE_IDS):
            f.write(json.dumps({"id": rid, "order": f"order {i}: {i + 2} boxes"}) + "\n")
    out = folder / "out"
    assert run_job("prompt", folder / "orders.jsonl", out, "--schema", str(folder / "schema.json"),
                   "--prompt", "Read {order}", "--max-new-tokens", "400", "--run-id", "edges") == 0
    return out


def test_every_kind_of_value_fits_its_column_and_numbers_stay_short(edges_run):
    import re

    table = read_output(edges_run)
    assert sorted(table["id"].to_pylist()) == EDGE_IDS  # one row per input
    assert table.schema.field("big").type == pa.int64() and table.schema.field("uri").type == pa.string()
    assert table.schema.field("ratio").type == pa.float64() and table.schema.field("maybe").type == pa.int64()
    rows = table.to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for row in rows:
        answer = json.loads(row["json"])
        from jsonschema import validate

        validate(answer, EDGES)
        assert 10**17 <= row["big"] == answer["big"] < 2**63  # huge, and held as written
        assert row["ratio"] == answer["ratio"] and row["maybe"] == answer["maybe"] and row["uri"] == answer["uri"]
        assert answer["nothing"] is None
        assert all(-2**63 <= line["qty"] < 2**63 for line in answer["lines"])
        for number in re.findall(r"-?\d+\.\d+", row["text"]):
            assert len(number.split(".")[1]) <= 6, number  # never a run of digits
        assert row["output_tokens"] < 400  # the answer ended on its own


def test_the_progress_line_counts_the_prompt_jobs_prepared_inputs(edges_run):
    from jobs.progress import progress_line

    record = json.loads((edges_run / "_runs" / "edges.json").read_text())
    assert "inputs 4/4 prepared, 4/4 done, 4 rows written" in progress_line(record["counters"], 4, 30.0)
