#!/usr/bin/env bash
# The main job end to end on the shipped samples, with a local one-machine Ray.
# With a CUDA GPU and access to the weights it runs the real model; elsewhere the tiny random checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-out/demo}
MODEL=${PHI4MM_MODEL:-microsoft/Phi-4-multimodal-instruct}
EXTRA=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 \
   && $PY -c "from pipeline.model.source import resolve_model; resolve_model('$MODEL', revision=None if '$MODEL' != 'microsoft/Phi-4-multimodal-instruct' else 'refs/pr/70')" >/dev/null 2>&1; then
  echo "== GPU and weights found: running $MODEL"
else
  cat <<'BANNER'
==============================================================================================
 No CUDA GPU or no access to the Phi-4-multimodal weights: using a TINY RANDOM checkpoint built
 offline (phi4mm tiny-model). The pipeline, the files and the row accounting are real; the
 TEXT IS MEANINGLESS.
==============================================================================================
BANNER
  MODEL=models/tiny-phi4mm
  [ -f "$MODEL/config.json" ] || .venv/bin/phi4mm tiny-model "$MODEL" >/dev/null
  EXTRA=(--max-new-tokens 48)
fi
rm -rf "$OUT"
.venv/bin/phi4mm transcribe samples/transcribe.csv "$OUT/calls" --translate-to fr --summarize --model "$MODEL" "${EXTRA[@]}"
.venv/bin/phi4mm meetings samples/meetings.jsonl "$OUT/meetings" --model "$MODEL" "${EXTRA[@]}"
.venv/bin/phi4mm ocr samples/ocr.csv "$OUT/documents" --model "$MODEL" "${EXTRA[@]}"
.venv/bin/phi4mm report "$OUT/calls" --html "$OUT/calls-report.html" >/dev/null
$PY - "$OUT" <<'PY'
import sys
import pyarrow.dataset as ds
out = sys.argv[1]
for name in ("calls", "meetings", "documents"):
    t = ds.dataset(f"{out}/{name}", format="parquet", partitioning="hive", ignore_prefixes=["_", "."]).to_table()
    df = t.to_pandas()
    print(f"\n{out}/{name}: {len(df)} rows  " + ", ".join(f"{k}={v}" for k, v in df.groupby(['task', 'status']).size().items()))
    for _, r in df.sort_values(["id", "task"]).head(4).iterrows():
        text = (r.text or r.error or "")[:70].replace("\n", " ")
        print(f"  {r.id:<12} {r.task:<10} p{r.page} {r.status:<5} {text!r}")
print(f"\nOutput: {out}/calls, {out}/meetings, {out}/documents (task=<task>/ Parquet), report: {out}/calls-report.html")
PY
