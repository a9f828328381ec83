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
exec .venv/bin/python -m pytest -q "$@"
