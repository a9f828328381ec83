"""The driver's two calls for `--table` (pipeline/io/lakehouse.py): the table checked (or created) before
Ray starts, and the finished run's files committed to it in one snapshot before the run record."""
from __future__ import annotations

import pyarrow as pa

from pipeline.io.lakehouse import commit_output, iceberg_ready, open_catalog, prepare_table
from pipeline.io.storage import Location, StorageOptions
from schemas.config import JobConfig
from schemas.results import result_schema
from schemas.structured import typed_fields
from schemas.table_uri import parse_table_uri


def table_passthrough(config: JobConfig, passthrough: pa.Schema) -> pa.Schema:
    """The manifest columns as the result rows carry them: with a table, an all-empty column (no type)
    is written as a string column, which Iceberg can hold."""
    return iceberg_ready(passthrough) if config.table else passthrough


def prepare_run_table(config: JobConfig, storage: StorageOptions, output: Location, passthrough: pa.Schema):
    """The table of `config.table`, ready for this run's rows, or None without one. TableError (a
    ValueError: one `phi4mm:` line, exit status 2) when the catalog cannot be reached or a column's type
    would change."""
    if not config.table:
        return None
    ref = parse_table_uri(config.table)
    catalog = open_catalog(ref, storage, config.table_catalog)
    run_schema = result_schema(passthrough, typed_fields(config.output_schema))
    return prepare_table(ref, catalog, run_schema, output)


def commit_run(table, config: JobConfig, output: Location) -> dict:
    """The output's files committed to the table (a no-op when it holds them already); what the run
    record keeps of the commit."""
    return {"uri": config.table, **commit_output(table, output, config.run_id)}
