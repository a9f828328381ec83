"""The command line as a user meets it: `phi4mm run JOB.yaml`, `phi4mm tiny-model`, `python -m jobs.X`,
and a bad config refused with a message that names the field, before any Ray starts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import yaml

from jobs.cli import main
from tests.conftest import REPO
from schemas.tasks import TASKS



def _python_m(module: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_run_job_yaml_runs_what_the_subcommand_runs(samples_copy, tiny_model, monkeypatch):
    """`phi4mm run JOB.yaml` runs the job the subcommand with the same settings would: the same JobConfig
    (but for output and run id)."""
    from jobs import runner

    calls = pd.read_csv(samples_copy / "transcribe.csv").head(2)
    calls.to_csv(samples_copy / "two_calls.csv", index=False)
    monkeypatch.chdir(samples_copy)  # relative paths in the YAML are taken from where the command runs
    job = {"job": "transcribe", "input": "two_calls.csv", "output": "out-yaml", "run_id": "yaml",
           "model": {"source": tiny_model}, "generation": {"max_new_tokens": {t: 8 for t in TASKS}}}
    (samples_copy / "nightly.yaml").write_text(yaml.safe_dump(job))

    seen = []
    with monkeypatch.context() as m:  # what each command would run, without running it
        m.setattr(runner, "run_job", lambda config, settings: seen.append(config) or
                  {"run_id": config.run_id, "counts": {}, "wall_s": 0.0})
        assert main(["transcribe", "two_calls.csv", "out-cli", "--model", tiny_model, "--max-new-tokens", "8",
                     "--run-id", "cli"]) == 0
        assert main(["run", "nightly.yaml"]) == 0
    cli, from_yaml = (c.model_dump(exclude={"output", "run_id"}) for c in seen)
    assert cli == from_yaml and seen[0].output.endswith("out-cli") and seen[1].run_id == "yaml"
    # both commands hand it to the same runner.run_job, which every whole-job test runs for real (a third
    # whole run here, 20 s, showed nothing those do not)


def test_tiny_model_command_builds_a_loadable_checkpoint(tmp_path, capsys):
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoProcessor

    from actors.tiny_model import ADAPTER_RANKS, is_tiny_model

    target = tmp_path / "tiny"
    assert main(["tiny-model", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert is_tiny_model(target)

    processor = AutoProcessor.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    assert type(model).__name__ == "Phi4MultimodalForCausalLM"
    assert type(processor).__name__ == "Phi4MultimodalProcessor"
    for adapter, rank in ADAPTER_RANKS.items():  # the per-modality LoRAs, in PEFT's layout
        config = PeftConfig.from_pretrained(target / adapter)
        assert config.r == rank and (target / adapter / "adapter_model.safetensors").exists()
    merged = PeftModel.from_pretrained(model, target / "speech-lora").merge_and_unload()

    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": "Thank you for calling."}],
                                                     tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]  # it generates (meaningless) tokens


@pytest.mark.parametrize("module,flag", [("jobs.ocr", "--dynamic-hd"), ("jobs.transcribe", "--translate-to"),
                                         ("jobs.meetings", "--max-chunk-s"), ("jobs.report", "--html"),
                                         ("jobs.prompt", "--schema")])
def test_python_m_jobs_help(module, flag):
    done = _python_m(module, "--help")
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout and "usage:" in done.stdout


def test_bad_job_yaml_is_refused_naming_the_field_before_ray_starts(tmp_path, tiny_model):
    job = {"job": "transcribe", "input": str(REPO / "samples" / "transcribe.csv"), "output": str(tmp_path / "out"),
           "model": {"source": tiny_model},
           "translate_too": ["fr"],  # a typo of translate_to
           "resources": {"gpu_per_replica": 0.5},  # a typo of gpus_per_replica
           "batching": {"max_batch_size": 0}}  # out of range
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # a Ray that started would leave its session here
    try:
        began = time.monotonic()
        done = _python_m("jobs.cli", "run", str(bad), env={"RAY_TMPDIR": ray_tmp})
        took = time.monotonic() - began
        assert done.returncode == 2, done.stdout + done.stderr
        err = done.stderr
        assert "invalid configuration" in err
        assert "translate_too" in err and "resources.gpu_per_replica" in err and "batching.max_batch_size" in err
        assert "Traceback" not in err  # one clear message, not a stack
        assert os.listdir(ray_tmp) == [], "Ray was started for a config that could not run"
        assert not (tmp_path / "out").exists()
        assert took < 30, f"refusing a bad config took {took:.0f} s"

        # the same through a subcommand's --config
        extra = tmp_path / "extra.yaml"
        extra.write_text(yaml.safe_dump({"audio": {"max_chunk_seconds": 20}}))
        done = _python_m("jobs.transcribe", str(REPO / "samples" / "transcribe.csv"), str(tmp_path / "out"),
                         "--model", tiny_model, "--config", str(extra), env={"RAY_TMPDIR": ray_tmp})
        assert done.returncode == 2 and "audio.max_chunk_seconds" in done.stderr, done.stderr
        assert os.listdir(ray_tmp) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("text,message", [
    ("model: /models/tiny\n", "`model` must be a mapping"),
    ("job: transcribe\ninput: [a\n", "not valid YAML"),
    ("- transcribe\n", "expected a mapping of JobConfig fields, got a list"),
    (None, "cannot be read"),
])
def test_unreadable_job_yaml_is_one_clear_line(tmp_path, capsys, monkeypatch, text, message):
    import jobs.runner

    monkeypatch.setattr(jobs.runner, "run_job", lambda *args: pytest.fail("the job must not start"))
    path = tmp_path / "job.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phi4mm: {path}: ") and message in err and "Traceback" not in err
    assert main(["transcribe", "in.csv", str(tmp_path / "out"), "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_config_file_model_source_is_kept_without_model_flag(tmp_path, tiny_model):
    """`--config` with model.source and no `--model`: the file's model runs, not the hub default."""
    import argparse

    from jobs.cli import add_job_arguments, config_from_args

    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"model": {"source": tiny_model, "cache_dir": str(tmp_path / "cache")}}))
    parser = argparse.ArgumentParser()
    add_job_arguments(parser, "transcribe")
    config = config_from_args("transcribe", parser.parse_args(["in.csv", "out", "--config", str(extra)]))
    assert config.model.source == tiny_model and config.model.cache_dir == str(tmp_path / "cache")
    config = config_from_args("transcribe", parser.parse_args(["in.csv", "out", "--config", str(extra),
                                                               "--model", "s3://models/other/"]))
    assert config.model.source == "s3://models/other/" and config.model.cache_dir == str(tmp_path / "cache")
    config = config_from_args("transcribe", parser.parse_args(["in.csv", "out"]))
    assert config.model.source == "microsoft/Phi-4-multimodal-instruct"


def test_help_lists_every_subcommand_at_once_and_version_prints():
    """`phi4mm --help` (and `phi4mm` alone) lists each subcommand with what it does, without importing
    torch, transformers, Ray or pyarrow first (it answered in 8 s when it did); `--version` prints."""
    from jobs.cli import COMMANDS

    probe = ("import sys, runpy; sys.argv = ['phi4mm', '--help']\n"
             "try:\n    runpy.run_module('jobs.cli', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'pyarrow', 'pydantic') if m in sys.modules)\n"
             "print('HEAVY', heavy, 'CODE', code)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "HEAVY [] CODE 0" in done.stdout, done.stdout + done.stderr
    for name, what in COMMANDS.items():
        assert f"  {name}" in done.stdout and what in done.stdout
    alone = _python_m("jobs.cli")
    assert alone.returncode == 2 and all(name in alone.stderr for name in COMMANDS)
    version = _python_m("jobs.cli", "--version")
    assert version.returncode == 0 and version.stdout.startswith("phi4mm ") and version.stdout.split()[1][0].isdigit()


def test_every_job_config_field_says_what_it_is():
    """Every field of JobConfig, nested ones included, carries a description (`Field(description=...)`)."""
    from pydantic import BaseModel

    from schemas.config import JobConfig

    missing = []

    def walk(model: type[BaseModel], prefix: str = "") -> None:
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(prefix + name)
            for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{prefix}{name}.")

    walk(JobConfig)
    assert not missing, f"fields without a description: {missing}"


def test_batch_size_help_says_it_sets_the_prefill_batch(capsys):
    with pytest.raises(SystemExit):
        main(["transcribe", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size" in help_text and "prefilled together" in help_text and "decode_slots" in help_text


def test_the_driver_checks_the_processor_without_loading_torch(tmp_path):
    """The driver refuses a model whose processor does not load, before Ray starts, and does it in a
    child process: torch and transformers (~0.9 GB) are never loaded by the driver of a job."""
    import subprocess
    import sys

    # (a model that loads passes the same check in every command-line job of the real-size tier)
    script = ("import sys; from jobs.runner import _check_processor\n"
              "try:\n    _check_processor(sys.argv[1])\nexcept ValueError as exc:\n    print(exc)\n"
              "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'loaded by the driver'")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"--model {tmp_path}: cannot load the processor/tokenizer ("), done.stdout
    assert len(done.stdout.strip().splitlines()) == 1  # one line, no stack
