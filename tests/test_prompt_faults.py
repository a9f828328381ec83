"""The prompt job's bad inputs, as a new user meets them, without Ray: each costs its own row (an error row
naming the row, the column and the value) or is refused before Ray starts with one `phi4mm:` line; none
hangs, none is evaluated, none is silently dropped or misreported.

- templates are filled, never evaluated: a format spec, conversion, attribute or index is refused;
- a prompt longer than the model's context is that row's error row, found before tokenising;
- a numeric `prompt` is its text, not "no prompt"; a null inside `images` is the row's error;
- a JSON Lines manifest whose `images` mixes kinds names the line and the column;
- an answer whose value its typed column cannot hold is that row's error row, never a failed job;
- bad --max-new-tokens and --tools are refused before Ray starts.
"""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from jobs.cli import main
from pipeline.io.manifest import read_manifest
from pipeline.context import RunContext
from schemas.config import JobConfig
from schemas.manifest import PROMPT_MEDIA_COLUMNS, ManifestError


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("phi4mm: "), err
    return lines[0]


@pytest.mark.parametrize("template, field, why", [
    ("{topic:>99999999}", "{topic:>99999999}", "has a format spec"),  # padded prompts of 100 M characters
    ("Classes: {id.__class__.__mro__}", "{id.__class__.__mro__}", "has an attribute or an index"),
    ("Row: {tags[0]}", "{tags[0]}", "has an attribute or an index"),
    ("Id: {id!r}", "{id!r}", "has a conversion"),
    ("Say {}", "{}", "names no column"),
])
def test_a_template_field_that_is_not_a_column_is_refused_before_ray(template, field, why, tmp_path, capsys, no_ray):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "topic": "cats"}\n')
    assert main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--prompt", template]) == 2
    line = one_line(capsys)
    assert line.startswith("phi4mm: --prompt: the prompt template ") and f"the field {field} {why}" in line
    assert not (tmp_path / "out").exists()


def test_a_lone_brace_is_refused_naming_the_file(tmp_path, capsys, no_ray):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "price": 3}\n')
    (tmp_path / "p.txt").write_text("What does it cost? price {")
    assert main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--prompt-file",
                 str(tmp_path / "p.txt")]) == 2
    line = one_line(capsys)
    assert line.startswith(f"phi4mm: --prompt-file {tmp_path / 'p.txt'}: the prompt template") and \
        "Single '{'" in line and "{{" in line


@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_new_tokens_below_one_is_refused_not_replaced(value, tmp_path, capsys, no_ray):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    assert main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--max-new-tokens", value]) == 2
    line = one_line(capsys)
    assert line.startswith(f"phi4mm: --max-new-tokens {value}: {value} new tokens for ") and "at least 1" in line


@pytest.mark.parametrize("tools, said", [
    ([{"name": "lookup", "parameters": ["order_id"]}], "tool 'lookup': \"parameters\" is a list, not an object"),
    ([{"name": "lookup", "parameters": {"type": "object", "properties": {"id": {"type": "strin"}}}}],
     "tool 'lookup': \"parameters\" is not a valid JSON Schema: 'strin' is not valid"),
    ([{"name": "lookup", "parameters": {"type": "array"}}], "a JSON Schema of type 'array', not \"object\""),
    ([{"name": "lookup", "parameters": {"order_id": "str"}}], "parameter 'order_id' is described by a str"),
    ([{"name": "lookup"}, {"name": "lookup"}], "tool 2: the name 'lookup' is tool 1's too"),
])
def test_bad_tools_are_refused_naming_the_file_and_the_tool(tools, said, tmp_path, capsys, no_ray):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    assert main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--tools",
                 str(tmp_path / "tools.json")]) == 2
    line = one_line(capsys)
    assert line.startswith(f"phi4mm: --tools {tmp_path / 'tools.json'}: ") and said in line, line


def test_the_cards_tool_format_and_a_json_schema_are_both_taken():
    card = [{"name": "get_weather", "parameters": {"city": {"type": "str", "description": "the city"}}}]
    schema = [{"name": "get_order", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}]
    for tools in (card, schema):
        assert JobConfig(job="prompt", input="i", output="o", prompt={"tools": tools}).prompt.tools == tools


# -- rows -------------------------------------------------------------------------------------------------

def prepare(tiny_model: str, table: pa.Table, template: str | None = None, **config) -> list[dict]:
    from pipeline.stages.prepare_prompts import PreparePrompts

    job = JobConfig(job="prompt", input="x", output="y", model={"source": tiny_model},
                    prompt={"template": template}, **config)
    return PreparePrompts(RunContext.for_tests(job))(table).to_pylist()


def said(row: dict, tiny_model: str) -> str:
    from pipeline.model.inputs import load_processor
    from schemas.work_rows import decode_item

    return load_processor(tiny_model).tokenizer.decode(decode_item(row["chunk_inputs"][0])["input_ids"])


def test_values_fill_a_template_as_text_and_a_numeric_prompt_is_the_prompt(tiny_model):
    table = pa.table({"id": ["a", "b", "c"], "uri": pa.nulls(3, pa.string()), "data": pa.nulls(3, pa.binary()),
                      "price": [3.5, 12.0, None], "prompt": pa.array([None, 42, None], pa.int64())})
    rows = prepare(tiny_model, table, "What is {price} plus {{tax}}?")
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["error"] is None and "What is 3.5 plus {tax}?" in said(rows[0], tiny_model)
    assert rows[1]["error"] is None and said(rows[1], tiny_model).split("<|user|>")[1].startswith("42")
    assert "'price' is empty" in rows[2]["error"]  # named, not "no prompt"


def test_a_null_inside_images_is_the_rows_error_not_dropped(tiny_model, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "gap", "images": ["a.png", None], "prompt": "Compare."}) + "\n"
                                      + json.dumps({"id": "fine", "images": ["a.png"], "prompt": "Describe."}) + "\n")
    table = read_manifest(str(tmp_path / "m.jsonl"), media_lists=PROMPT_MEDIA_COLUMNS, require_media=False)
    assert table["images"].to_pylist()[0] == [str(tmp_path / "a.png"), None]  # kept by the reader
    rows = {r["id"]: r for r in prepare(tiny_model, table, image={"dynamic_hd": 1})}
    assert rows["gap"]["error"] == "id gap: item 2 of the 2 in its `images` list is null, not a uri"
    assert rows["fine"]["error"] is None


def test_a_prompt_longer_than_the_context_is_the_rows_error_not_a_hang(tiny_model, tmp_path):
    small = tmp_path / "tiny-512"  # the tiny model with a context of 512 tokens
    shutil.copytree(tiny_model, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 512
    (small / "config.json").write_text(json.dumps(config))
    table = pa.table({"id": ["huge", "long", "short"], "uri": pa.nulls(3, pa.string()),
                      "data": pa.nulls(3, pa.binary()), "topic": ["x" * 50_000_000, "word " * 600, "cats"]})
    rows = {r["id"]: r for r in prepare(str(small), table, "Write about {topic}.",
                                        generation={"max_new_tokens": {"prompt": 64}})}
    assert "the prompt is 50000013 characters, more than the model's context of 512 tokens" in rows["huge"]["error"]
    assert "tokens; with 64 new tokens (generation.max_new_tokens) it passes the model's context of 512" \
        in rows["long"]["error"]
    assert rows["short"]["error"] is None


# -- the manifest ---------------------------------------------------------------------------------------

def read_prompts(path):
    return read_manifest(str(path), media_lists=PROMPT_MEDIA_COLUMNS, require_media=False)


def test_json_lines_mixing_one_uri_and_lists_reads_and_a_bad_kind_names_line_and_column(tmp_path):
    lines = [{"id": "a", "images": "x.png"}, {"id": "b", "images": ["y.png", "z.png"]},
             {"id": "c", "prompt": 7}, {"id": "d", "prompt": "text"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = read_prompts(path)
    assert table["images"].to_pylist() == [[str(tmp_path / "x.png")], [str(tmp_path / "y.png"),
                                           str(tmp_path / "z.png")], None, None]
    assert table["prompt"].to_pylist() == [None, None, "7", "text"]
    for bad, message in (({"id": "e", "images": 5}, "line 5: column 'images' holds a number (5)"),
                         ({"id": "e", "images": ["y.png", {"u": 1}]}, "line 5: column 'images': item 2 is an object"),
                         ({"id": "e", "segment": ["x"]}, "column 'segment': line 5 holds a list")):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines + [bad]).replace(
            '"id": "a"', '"id": "a", "segment": "retail"'))
        with pytest.raises(ManifestError) as err:
            read_prompts(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


# -- answers --------------------------------------------------------------------------------------------

def test_an_answer_its_typed_column_cannot_hold_is_the_rows_error_never_the_jobs():
    """Values the grammar keeps out (run under the grammar: tests/test_structured.py), fed to the stage as
    if a model had written them: every row comes out, the ok ones with typed columns equal to `json`."""
    from pipeline.stages.structured_answers import StructuredAnswers

    schema = {"type": "object", "properties": {
        "n": {"type": ["integer", "null"]}, "x": {"type": "number"}, "s": {"type": "string"},
        "pinned": {"type": "integer", "enum": [7, 1]}, "deep": {}}, "required": ["x"]}
    config = JobConfig(job="prompt", input="i", output="o", prompt={"json_schema": schema})
    answers = {
        "ok": '{"n":9000000000000000000,"x":2.5,"s":"fine","pinned":1,"deep":{"a":[{"b":null}]}}',
        "nulls": '{"n":null,"x":0}',
        "past_int64": '{"n":9223372036854775808,"x":1}',
        "past_float64": '{"x":1e400}',
        "surrogate": '{"x":1,"s":"\\ud800"}',
        "too_many_digits": '{"x":1,"n":' + "9" * 5000 + "}",
        "too_deep": '{"x":1,"deep":' + "[" * 100_000 + "]" * 100_000 + "}",
        "cut_off": '{"x":1,"s":"abc',
    }
    n = len(answers)
    batch = pa.table({"id": list(answers), "task": ["prompt"] * n, "error": pa.nulls(n, pa.string()),
                      "text": list(answers.values())})
    out = StructuredAnswers(RunContext.for_tests(config))(batch).to_pylist()
    assert [r["id"] for r in out] == list(answers)  # one row per row in, none lost
    rows = {r["id"]: r for r in out}
    for rid in ("ok", "nulls"):
        row = rows[rid]
        assert row["error"] is None, row["error"]
        answer = json.loads(row["json"])
        for name in ("n", "x", "s", "pinned"):
            assert row[f"schema:{name}"] == answer.get(name)
    errors = {
        "past_int64": "property 'n' = 9223372036854775808 does not fit its int64 column",
        "past_float64": "property 'x' = Infinity does not fit its float64 column",
        "surrogate": "property 's' = \"\\ud800\" is not UTF-8 text",
        "too_many_digits": "the answer is not JSON",
        "too_deep": "nests too deeply",
        "cut_off": "the answer is not JSON",
    }
    for rid, message in errors.items():
        row = rows[rid]
        assert row["error"].startswith(f"id {rid}: ") and message in row["error"], row["error"]
        assert row["json"] is None and all(row[f"schema:{n}"] is None for n in ("n", "x", "s", "pinned"))
