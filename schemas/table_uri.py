"""`iceberg://CATALOG/NAMESPACE.TABLE`: the Iceberg table a run's files are committed to (`JobConfig.table`).

CATALOG says where the table's catalog is:
- a SQLite file (a path: `./catalog.db`, `/srv/lake/catalog.db`, `~/catalog.db`, or a name ending in .db,
  .sqlite or .sqlite3): pyiceberg's SQL catalog on that file, created on first use (the embedded default:
  nothing to set up);
- `glue`: AWS Glue, in the region of the run's storage options (or the AWS SDK's default chain);
- any other name: a catalog configured for pyiceberg under that name (`~/.pyiceberg.yaml`, or
  `PYICEBERG_CATALOG__<NAME>__URI=https://...` and friends for a REST catalog), with `JobConfig.table_catalog`
  properties added on top.

NAMESPACE may be nested (`lake.calls.results`: namespace `lake.calls`, table `results`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SCHEME = "iceberg://"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
EXAMPLE = "iceberg://./catalog.db/calls.results"


@dataclass(frozen=True)
class TableUri:
    uri: str
    catalog: str  # a SQLite path, "glue", or a catalog name
    namespace: tuple[str, ...]
    name: str

    @property
    def identifier(self) -> tuple[str, ...]:
        return (*self.namespace, self.name)

    @property
    def kind(self) -> str:
        """"sqlite", "glue" or "named"."""
        c = self.catalog
        if "/" in c or c.startswith((".", "~")) or c.lower().endswith(SQLITE_SUFFIXES):
            return "sqlite"
        return "glue" if c.lower() == "glue" else "named"

    def sqlite_path(self) -> str:
        """The SQLite file, absolute (a relative one is taken from the driver's working directory)."""
        return os.path.abspath(os.path.expanduser(self.catalog))

    def __str__(self) -> str:
        return self.uri


def parse_table_uri(uri: str) -> TableUri:
    """The parts of `iceberg://CATALOG/NAMESPACE.TABLE`; ValueError saying what is wrong otherwise."""
    text = (uri or "").strip()
    if not text.lower().startswith(SCHEME):
        raise ValueError(f"table {uri!r} must look like iceberg://CATALOG/NAMESPACE.TABLE, e.g. {EXAMPLE}")
    catalog, sep, dotted = text[len(SCHEME):].rpartition("/")
    parts = dotted.split(".")
    if not sep or not catalog or len(parts) < 2 or not all(p.strip() for p in parts):
        raise ValueError(f"table {uri!r}: expected iceberg://CATALOG/NAMESPACE.TABLE (a catalog, then a "
                         f"namespace and a table name joined by '.'), e.g. {EXAMPLE}")
    return TableUri(text, catalog, tuple(parts[:-1]), parts[-1])
