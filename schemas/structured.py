"""Structured output (`phi4mm prompt --schema`, `--extract`): the JSON Schema a run's answers must follow,
checked before Ray starts, the bounded schema the grammar follows, and the typed Parquet columns its
top-level scalar properties become.

| schema property                          | column type |
|------------------------------------------|-------------|
| `"type": "string"`, `"enum": [strings]`  | string      |
| `"type": "integer"`                      | int64       |
| `"type": "number"`                       | float64     |
| `"type": "boolean"`                      | bool        |
| (`["<type>", "null"]`: the same, nullable; objects, arrays, mixed types: only in the `json` column)

A property that is missing or null in an answer is null in its column. Every value a typed column gets
is the one the `json` column holds: the grammar keeps integers inside int64 and numbers to a bounded
count of digits (`generation_schema`), and an answer holding a value its column still cannot hold (past
int64 or float64, text that is not UTF-8) is an error row naming the property and the value, never a
failed job.
"""
from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator

import pyarrow as pa

SCALAR_TYPES: dict[str, pa.DataType] = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                                        "boolean": pa.bool_()}
# typed columns travel in a work table under this prefix (as pass-through columns travel under theirs)
TYPED_PREFIX = "schema:"

# The grammar's bounds on numbers where the schema sets none (or a wider one): integers within
# +-9e18, which int64 (+-9.22e18) holds; llguidance reads a bound as a float64, and 9e18 is exact in
# one (int64's own limit is not: it rounds to 2**63, past the range, and llguidance refuses it).
INTEGER_LIMIT = 9 * 10**18
# numbers within +-1e15 (15 digits before the point) and a multiple of 10**-number_decimals (the
# config's digits after it): a number is at most ~22 characters, never a run of digits that eats the
# token budget (a tiny model wrote 2.7299999999998058099999... until its tokens ran out)
NUMBER_LIMIT = 10**15
# the bounded "any JSON value", for schema nodes that admit anything (no "type"): its strings, arrays,
# objects and numbers bounded as above, its members bounded the same way (a recursive reference)
ANY_VALUE = "phi4mm_any_value"

# keywords whose value is a map of names to subschemas, one subschema, or a list of subschemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "additionalItems", "items", "not", "if", "then", "else", "contains",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


class SchemaFileError(ValueError):
    """A --schema that cannot constrain generation; the message names the keyword and where it is."""


def check_output_schema(schema: object, reserved: tuple[str, ...] = ()) -> dict:
    """`schema` if it is a valid JSON Schema (its own draft's metaschema, jsonschema's message if not)
    with an object at the top whose typed columns do not take a `reserved` name and whose properties all
    have a name (a column needs one)."""
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
    if "" in (schema.get("properties") or {}):
        raise SchemaFileError('a property named "" (at properties): a column needs a name; name the property')
    taken = [f.name for f in typed_fields(schema) if f.name in reserved]
    if taken:
        raise SchemaFileError(f"schema properties {taken} have the names of result columns; rename them")
    return schema


def grammar_problem(schema: dict, max_string_chars: int, max_items: int, number_decimals: int) -> str | None:
    """Why the grammar engine (llguidance) cannot constrain answers to `schema` under these bounds, or
    None: a keyword it does not implement (uniqueItems, not, if/then, contains, propertyNames, ...), an
    unknown format, a regex it cannot compile (look-ahead), a $ref to nothing, or a schema no value
    satisfies (an empty enum that is required, a minimum above the maximum). The message names the
    keyword and where it is (a path of keys from the top)."""
    import llguidance

    bounded = generation_schema(schema, max_string_chars, max_items, number_decimals)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(bounded, defaults=GRAMMAR_OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except ValueError as exc:
        is_error, messages = True, [str(exc)]
    if not is_error:
        return None
    said = (messages[0] if messages else "rejected").strip()
    first = said.splitlines()[-1].removeprefix("error: ") if said.startswith("regex parse error") else \
        said.splitlines()[0]
    if "nsatisfiable" in said:
        return (f"{_culprit(schema, said)}: no answer satisfies it (llguidance: {first}), e.g. an empty enum or a "
                f"minimum above its maximum; the grammar also bounds integers to -9e18..9e18, numbers to "
                f"-1e15..1e15 with at most {number_decimals} decimals, strings to {max_string_chars} characters "
                f"and arrays to {max_items} items where the schema does not")
    return f"{_culprit(schema, said)}: the grammar engine cannot enforce it (llguidance: {first})"


# the JSON compile options of actors/grammar.py (json_schema_grammar): compact JSON, no free whitespace
GRAMMAR_OPTIONS = {"whitespace_flexible": False}


def _culprit(schema: dict, said: str) -> str:
    """The keyword an llguidance message is about, and where it is in the schema."""
    unimplemented = re.match(r"Unimplemented keys?: (\[.*\])", said)
    if unimplemented:
        try:
            keys = json.loads(unimplemented.group(1))
        except ValueError:
            keys = []
        for key in keys:
            where = _find(schema, lambda node: key in node)
            if where is not None:
                return f'"{key}" at {where}'
        return ", ".join(f'"{k}"' for k in keys) or "a keyword"
    tests = []
    if fmt := re.match(r"Unknown format: (.*)", said):
        name = fmt.group(1).strip()
        tests.append(("format", lambda node: node.get("format") == name))
    if pointer := re.match(r"Pointer '(.*)' does not exist", said):
        target = pointer.group(1)
        tests.append(("$ref", lambda node: isinstance(node.get("$ref"), str) and node["$ref"].endswith(target)))
    if said.startswith("regex parse error"):
        tests.append(("pattern", lambda node: isinstance(node.get("pattern"), str) and node["pattern"] in said))
        tests.append(("patternProperties", lambda node: any(p in said for p in node.get("patternProperties") or {})))
    if "Properties" in said:
        tests += [(k, lambda node, k=k: k in node) for k in ("minProperties", "maxProperties")]
    if value := re.match(r"Value is not JSON serializable: (.*)", said):  # e.g. an integer past 64 bits
        text = value.group(1).strip()
        tests.append(("enum", lambda node: any(str(v) == text for v in node.get("enum") or [])))
        tests.append(("const", lambda node: "const" in node and str(node["const"]) == text))
    required = re.search(r"required property '(.*)' is unsatisfiable", said)
    for key, test in tests:
        where = _find(schema, test)
        if where is not None:
            return f'"{key}" at {where}'
    if required:
        where = _find(schema, lambda node: required.group(1) in (node.get("required") or []))
        if where is not None:
            return f'"required" at {where} (property "{required.group(1)}")'
    return "the schema"


def _find(schema: dict, test) -> str | None:
    """The path (keys from the top, "/"-joined; "the top" for the root) of the first subschema `test`
    holds for, or None."""
    for path, node in subschemas(schema):
        if test(node):
            return "/".join(path) if path else "the top"
    return None


def subschemas(node: object, path: tuple[str, ...] = (), skip: tuple[str, ...] = ()
               ) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(path, subschema) for `node` and every schema inside it, depth first (property names are path
    parts, never taken for keywords), leaving out what is under a keyword in `skip`."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict) and key not in skip:
            for name, child in node[key].items():
                yield from subschemas(child, path + (key, str(name)), skip)
    for key in _SCHEMA_ONE:
        if isinstance(node.get(key), dict) and key not in skip:
            yield from subschemas(node[key], path + (key,), skip)
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list) and key not in skip:
            for k, child in enumerate(node[key]):
                yield from subschemas(child, path + (key, str(k)), skip)


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


def typed_values(answer: dict, fields: list[pa.Field]) -> tuple[dict[str, object], list[str]]:
    """({column: value}, problems) from a validated answer; a missing or null property is None. A value
    its column cannot hold as the `json` column holds it (an integer past int64, a number past float64,
    text that is not UTF-8) is a problem naming the property and the value, and None."""
    out, problems = {}, []
    for field in fields:
        value = answer.get(field.name) if isinstance(answer, dict) else None
        value, why = column_value(value, field.type)
        if why:
            shown = json.dumps(answer.get(field.name), ensure_ascii=True)
            shown = shown if len(shown) <= 60 else shown[:40] + f"... ({len(shown)} characters)"
            problems.append(f"property {field.name!r} = {shown} {why}")
        out[field.name] = value
    return out, problems


def column_value(value: object, typ: pa.DataType) -> tuple[object, str | None]:
    """(the value as its column holds it, None) or (None, why the column cannot hold it)."""
    if value is None:
        return None, None
    if pa.types.is_integer(typ):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
            return value, None
        return None, "does not fit its int64 column"
    if pa.types.is_floating(typ):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number, None
        return None, "does not fit its float64 column"
    if pa.types.is_string(typ):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
                return value, None
            except UnicodeEncodeError:
                return None, "is not UTF-8 text (an unpaired surrogate), which its string column cannot hold"
        return None, "is not text"
    if pa.types.is_boolean(typ):
        return (value, None) if isinstance(value, bool) else (None, "is not true or false")
    return None, f"cannot be held by its {typ} column"


def answer_json(answer: object) -> tuple[str | None, str | None]:
    """(the answer as compact JSON, None) or (None, why it cannot be written as JSON: a number past
    float64, read as infinity). Text that UTF-8 cannot carry (an unpaired surrogate) is escaped."""
    try:
        text = json.dumps(answer, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return None, "it holds a number past float64's range, which JSON output cannot carry"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(answer, ensure_ascii=True, separators=(",", ":"))
    return text, None


def generation_schema(schema: dict, max_string_chars: int, max_items: int, number_decimals: int = 6) -> dict:
    """The schema the grammar follows: the same answers, bounded where the schema sets no bound (or a
    wider one), so that generation ends within its token budget even when a model wanders and every value
    fits its typed column. Every answer it admits is valid under `schema`:

    - strings at most `max_string_chars` characters, arrays at most `max_items` items;
    - objects that name properties take no others; an open object at most `max_items` members, each
      a bounded value;
    - integers within +-INTEGER_LIMIT (int64 holds them); numbers within +-NUMBER_LIMIT and a multiple of
      10**-number_decimals (no exponent, a bounded count of digits);
    - a node that admits any value (no "type") admits any *bounded* value: strings, arrays, objects and
      numbers in it bounded as above, at every depth.

    `enum` and `const` keep their values; a `$ref`, `anyOf`, `oneOf` or `allOf` node without a type
    is bounded through what it refers to or combines."""
    out = copy.deepcopy(schema)
    limits = (max_string_chars, max_items, number_decimals)
    used = [False]

    def any_value() -> dict:
        used[0] = True
        return {"$ref": f"#/$defs/{ANY_VALUE}"}

    # (not under `not` or `if`: a bound there would widen what the schema admits, not narrow it)
    for _, node in list(subschemas(out, skip=("not", "if"))):
        _bound(node, limits, any_value)
        for key in ("properties", "patternProperties"):  # `true`: any value, bounded
            if isinstance(node.get(key), dict):
                for name, child in node[key].items():
                    if child is True:
                        node[key][name] = any_value()
        for key in ("prefixItems", "items"):
            if isinstance(node.get(key), list):
                node[key] = [any_value() if child is True else child for child in node[key]]
    if used[0]:
        anything: dict = {}
        _bound(anything, limits, any_value)
        out.setdefault("$defs", {})[ANY_VALUE] = anything
    return out


_ALL_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")


def _bound(node: dict, limits: tuple[int, int, int], any_value) -> None:
    """Add the bounds of `generation_schema` to one schema node (in place)."""
    max_string_chars, max_items, decimals = limits
    if "enum" in node or "const" in node:
        return
    kinds = node.get("type")
    if kinds is None:
        if any(k in node for k in ("$ref", "anyOf", "oneOf", "allOf")):
            return
        kinds = _ALL_TYPES
    kinds = set(kinds if isinstance(kinds, (list, tuple)) else [kinds])
    if "string" in kinds:
        node.setdefault("maxLength", max_string_chars)
    if "array" in kinds:
        node.setdefault("maxItems", max_items)
        if node.get("items", True) is True and not isinstance(node.get("items"), list):
            node["items"] = any_value()
    if "object" in kinds:
        if "properties" in node:
            node.setdefault("additionalProperties", False)
        if node.get("additionalProperties", True) is True:
            node["additionalProperties"] = any_value()
            if "properties" not in node and "required" not in node:
                node.setdefault("maxProperties", max_items)
    if "number" in kinds:
        _clamp(node, NUMBER_LIMIT)
        node.setdefault("multipleOf", 10.0 ** -decimals if decimals else 1)
    elif "integer" in kinds:
        _clamp(node, INTEGER_LIMIT)


def _clamp(node: dict, limit: int) -> None:
    """minimum/maximum within +-limit (kept where the schema's own bound is tighter)."""
    low, high = node.get("minimum"), node.get("maximum")
    number = (int, float)
    node["minimum"] = max(low, -limit) if isinstance(low, number) and not isinstance(low, bool) else -limit
    node["maximum"] = min(high, limit) if isinstance(high, number) and not isinstance(high, bool) else limit
