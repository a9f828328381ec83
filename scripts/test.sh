#!/usr/bin/env bash
# The test command (README): installs what the tests need, then runs the CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# headless Chromium renders the HTML report to PNG in a test
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed" >&2
fi
# a Java runtime for pyspark (a test reads the output with Spark, in local mode)
if ! command -v java >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null) || echo "java not installed" >&2
fi
# With arguments: one pytest run with them (e.g. `-m realsize` for the real-size tier alone, or a file).
# Without: the fast tier first (fails first), then the real-size tier (pyproject.toml's markers).
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q --durations=25
exec .venv/bin/python -m pytest -q -m realsize --durations=0
