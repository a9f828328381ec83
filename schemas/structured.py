"""Structured output (`phi4mm prompt --schema`): the JSON Schema a run's answers must follow, checked
before Ray starts, and the typed Parquet columns its top-level scalar properties become.

| schema property                          | column type |
|------------------------------------------|-------------|
| `"type": "string"`, `"enum": [strings]`  | string      |
| `"type": "integer"`                      | int64       |
| `"type": "number"`                       | float64     |
| `"type": "boolean"`                      | bool        |
| (`["<type>", "null"]`: the same, nullable; objects, arrays, mixed types: only in the `json` column)

A property that is missing or null in an answer is null in its column.
"""
from __future__ import annotations

import copy

import pyarrow as pa

SCALAR_TYPES: dict[str, pa.DataType] = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                                        "boolean": pa.bool_()}
# typed columns travel in a work table under this prefix (as pass-through columns travel under theirs)
TYPED_PREFIX = "schema:"


class SchemaFileError(ValueError):
    """A --schema that cannot constrain generation; the message is the validator's."""


def check_output_schema(schema: object, reserved: tuple[str, ...] = ()) -> dict:
    """`schema` if it is a valid JSON Schema (its own draft's metaschema, jsonschema's message if not)
    with an object at the top whose typed columns do not take a `reserved` name."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise SchemaFileError(f"the schema must be a JSON object, not {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise SchemaFileError(f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")) \
            from None
    if schema.get("type") != "object":
        raise SchemaFileError('the schema must describe an object at the top ("type": "object"), so that its '
                              "properties can become columns")
    taken = [f.name for f in typed_fields(schema) if f.name in reserved]
    if taken:
        raise SchemaFileError(f"schema properties {taken} have the names of result columns; rename them")
    return schema


def scalar_type(prop: dict) -> pa.DataType | None:
    """The column type of one property, or None (not a scalar: only in `json`)."""
    if not isinstance(prop, dict):
        return None
    if "enum" in prop and "type" not in prop:
        values = [v for v in prop["enum"] if v is not None]
        return pa.string() if values and all(isinstance(v, str) for v in values) else None
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return SCALAR_TYPES.get(kind) if isinstance(kind, str) else None


def typed_fields(schema: dict | None) -> list[pa.Field]:
    """The typed columns of a schema's top-level scalar properties, in the schema's order."""
    if not schema:
        return []
    props = schema.get("properties") or {}
    return [pa.field(name, typ) for name, prop in props.items() if (typ := scalar_type(prop)) is not None]


def typed_values(answer: dict, fields: list[pa.Field]) -> dict[str, object]:
    """{column: value} from a validated answer; a missing or null property is None."""
    out = {}
    for field in fields:
        value = answer.get(field.name) if isinstance(answer, dict) else None
        if value is not None and pa.types.is_floating(field.type):
            value = float(value)
        out[field.name] = value
    return out


def generation_schema(schema: dict, max_string_chars: int, max_items: int) -> dict:
    """The schema the grammar follows: the same answers, with every string and array bounded (when the
    schema does not bound it) and no properties beyond those it names, so that generation ends within
    its token budget even when a model wanders. Every answer it admits is valid under `schema`."""
    out = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "string" in kinds and "maxLength" not in node and "enum" not in node and "const" not in node:
            node["maxLength"] = max_string_chars
        if "array" in kinds and "maxItems" not in node:
            node["maxItems"] = max_items
        if "object" in kinds and "additionalProperties" not in node and "properties" in node:
            node["additionalProperties"] = False
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                for child in node[key].values():
                    walk(child)
        for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            walk(node.get(key))

    walk(out)
    return out
