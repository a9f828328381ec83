"""`phi4mm report OUTPUT`: what a finished output dataset holds, how fast it was made, how good it is.

    python -m jobs.report OUTPUT [--html FILE] [--json FILE] [--s3-endpoint URL]

The entry point; the work is in three modules, one job each:
- `jobs.report_data`: reads the result dataset and the run records (through the same filesystem and
  `StorageOptions` as the jobs) and builds the report, one JSON-friendly dict (`build_report`);
- `jobs.report_plots`: its matplotlib figures, as base64 PNGs;
- `jobs.report_html`: the self-contained HTML page (`render_html`, `write_html`) and the terminal
  summary (`format_summary`).
The names other code uses are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.report_data import build_report, normalize_error, resolve_filesystem
from jobs.report_html import format_summary, render_html, write_html
from pipeline.io.storage import StorageOptions

__all__ = ["main", "build_report", "normalize_error", "resolve_filesystem", "format_summary", "render_html",
           "write_html"]


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.report OUTPUT [--html FILE] [--json FILE]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="phi4mm report", description="Counts, throughput, errors and scores "
                                     "of an output dataset, as text, HTML and JSON.")
    parser.add_argument("output", help="the output dataset (local path or s3://...), or the Iceberg table a "
                        "job committed to (iceberg://CATALOG/NAMESPACE.TABLE)")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML page here")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON here")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (MinIO, Ceph, R2)")
    args = parser.parse_args(argv)
    options = StorageOptions(endpoint_url=args.s3_endpoint)  # the jobs' settings: endpoint, region, profile
    try:
        report = build_report(args.output, options=options)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: a table whose catalog cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    if args.html:
        write_html(report, args.html)
        print(f"wrote {args.html}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, allow_nan=False)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
