"""A poison input: one that kills its GPU worker process every time it runs.

Ray restarts a dead actor and retries its call without limit, so such an input used to be retried
forever. The run's journal (pipeline/core/run_state.py: RunState) sees the rows of a call whose worker died
come back; their batch is then run one row at a time, and a row that killed its worker while alone
`resources.poison_after_deaths` times becomes an error row without running again. The test input
kills its worker through the test-only hook `benchmark.exit_worker_on_ids` (os._exit in the stage).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.core.run_state import RunState
from tests.conftest import read_output

MAX_NEW = "6"


def test_journal_counts_deaths_alone_and_in_company():
    journal = RunState()
    a, b = ("a", "asr", None, 1), ("b", "asr", None, 1)
    assert journal.deaths("S", [a, b]) == {}
    journal.begin("S", [a, b])  # ... and the worker dies: no end()
    assert journal.deaths("S", [a, b]) == {a: (1, 0), b: (1, 0)}
    journal.begin("S", [a])
    journal.end("S", [a])  # a finished alone
    journal.begin("S", [b])  # b dies alone
    assert journal.deaths("S", [a, b]) == {a: (1, 0), b: (2, 1)}
    assert journal.deaths("Other", [a, b]) == {}  # per stage
    assert journal.snapshot()["S"]["rows_in_dead_calls"] == 3


@pytest.mark.realsize
def test_an_input_that_kills_its_worker_ends_as_an_error_row(run_job, samples_copy):
    calls = pd.read_csv(samples_copy / "transcribe.csv")
    manifest = samples_copy / "poison.csv"
    calls.to_csv(manifest, index=False)
    poison = calls.id[1]
    config = samples_copy / "poison.yaml"
    # one death alone is enough here (the default is 2): each death costs a model load
    config.write_text(f"benchmark:\n  exit_worker_on_ids: [{poison}]\nresources:\n  poison_after_deaths: 1\n")
    out = samples_copy.parent / "out"
    rc = run_job("transcribe", manifest, out, "--max-new-tokens", MAX_NEW, "--run-id", "poison",
                 "--config", str(config))
    assert rc == 0
    rows = read_output(out).to_pandas().set_index("id")
    assert sorted(rows.index) == sorted(calls.id)  # every input once: nothing lost, nothing doubled
    bad = rows.loc[poison]
    assert bad.status == "error" and "killed its worker 1 time " in bad.error and "not run again" in bad.error
    good = rows.drop(index=poison)
    assert (good.status == "ok").all(), good.error.to_dict()
    assert good.text.str.len().gt(0).all()
    record = json.loads((out / "_runs" / "poison.json").read_text())
    assert record["counts"] == {"asr": {"ok": len(calls) - 1, "error": 1}}
    speech = record["counters"]["SpeechStage"]
    assert speech["poison_rows"] == 1 and speech["rows_in_dead_calls"] >= 2
