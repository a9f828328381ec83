"""`phi4mm prompt --tools`: the card's tool block in the system message, the calls parsed into columns."""
from __future__ import annotations

import json

import pyarrow as pa

from pipeline.stages.tool_calls import ToolCalls, parse_tool_calls

TOOLS = [{"name": "get_order_status", "description": "Look up an order",
          "parameters": {"order_id": {"type": "string", "description": "the order number"}}}]


def test_calls_are_parsed_and_words_are_not():
    card = '<|tool_call|>[{"name": "get_order_status", "arguments": {"order_id": "A-17"}}]<|/tool_call|>'
    assert parse_tool_calls(card) == [{"name": "get_order_status", "arguments": '{"order_id": "A-17"}'}]
    two = '[{"name": "a", "arguments": {}}, {"type": "function", "function": {"name": "b", "arguments": "{\\"x\\": 1}"}}]'
    assert parse_tool_calls(two) == [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": '{"x": 1}'}]
    for words in ("Your order ships tomorrow.", "[not json", '[{"no_name": 1}]', "", None):
        assert parse_tool_calls(words) is None


def test_tool_calls_column():
    from pipeline.context import RunContext
    from schemas.config import JobConfig

    batch = pa.table({"task": ["prompt"] * 3, "error": [None, None, "id c: bad"],
                      "text": ['[{"name": "get_order_status", "arguments": {"order_id": "9"}}]', "Hello.",
                               '[{"name": "x", "arguments": {}}]']})
    config = JobConfig(job="prompt", input="x", output="y", prompt={"tools": TOOLS})
    calls = ToolCalls(RunContext.for_tests(config))(batch)["tool_calls"].to_pylist()
    assert calls == [[{"name": "get_order_status", "arguments": '{"order_id": "9"}'}], None, None]


def test_tools_go_in_the_system_message_the_cards_way(tiny_model):
    from pipeline.model.inputs import load_processor
    from pipeline.stages.prepare_prompts import PreparePrompts
    from pipeline.context import RunContext
    from schemas.config import JobConfig
    from schemas.work_rows import decode_item

    config = JobConfig(job="prompt", input="x", output="y", model={"source": tiny_model}, prompt={"tools": TOOLS})
    stage = PreparePrompts(RunContext.for_tests(config))
    rows = stage(pa.table({"id": ["a"], "uri": pa.nulls(1, pa.string()), "data": pa.nulls(1, pa.binary()),
                           "prompt": ["Where is order 9?"]})).to_pylist()
    said = load_processor(tiny_model).tokenizer.decode(decode_item(rows[0]["chunk_inputs"][0])["input_ids"])
    assert said.startswith("<|system|>You are a helpful assistant with some tools.<|tool|>"
                           + json.dumps(TOOLS) + "<|/tool|><|end|><|user|>Where is order 9?")


def test_bad_tools_file_is_refused(tmp_path, tiny_model, capsys):
    from jobs.cli import main

    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    (tmp_path / "tools.json").write_text(json.dumps([{"description": "no name"}]))
    rc = main(["prompt", str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--model", tiny_model,
               "--tools", str(tmp_path / "tools.json")])
    assert rc == 2 and 'has no "name"' in capsys.readouterr().err
