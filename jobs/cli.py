"""`phi4mm` command line (stable): transcribe, ocr, meetings, prompt, report, tiny-model, run, convert-checkpoint.

`python -m jobs.transcribe ...` (and jobs.ocr, jobs.meetings, jobs.report) take the same arguments, so
`ray job submit --working-dir . -- python -m jobs.transcribe IN OUT` works on a cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `phi4mm --help` must answer at once, without torch or pyarrow
    from schemas.config import JobConfig

# every subcommand, with what it does (`phi4mm --help`)
COMMANDS = {
    "transcribe": "speech to text over call recordings, with --translate-to, --summarize, --extract",
    "meetings": "transcript and summary of long recordings (hours), with --extract",
    "ocr": "page text as Markdown from images, scans and PDFs",
    "prompt": "any prompt over each row's audio, images and video, with --schema and --tools",
    "report": "counts, throughput, scores and plots of an output folder, as HTML",
    "tiny-model": "build a tiny random checkpoint offline (tests, demos)",
    "run": "run any of the jobs from a config file (JOB.yaml)",
    "convert-checkpoint": "convert a main-branch checkpoint into the native transformers layout",
}
JOB_COMMANDS = ("transcribe", "ocr", "meetings", "prompt")


class ConfigFileError(ValueError):
    """A config file that cannot be read as a JobConfig mapping (missing, not YAML, not a mapping)."""


def load_yaml_mapping(path: str) -> dict:
    """The YAML file at `path` as a dict; ConfigFileError naming the file when it is not one."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of JobConfig fields, got a {type(data).__name__}")
    if "model" in data and not isinstance(data["model"], dict):
        raise ConfigFileError(f"{path}: `model` must be a mapping, e.g. model: {{source: {data['model']!r}}}")
    return data


def _local_abspath(value: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if "://" in value or not value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def add_job_arguments(parser: argparse.ArgumentParser, job: str) -> None:
    from schemas.config import DEFAULT_MODEL

    parser.add_argument("input", help="manifest (Parquet file/folder/glob, CSV, JSON Lines) or a media prefix")
    parser.add_argument("output", help="output dataset folder (local or s3://)")
    parser.add_argument("--model", default=None,
                        help=f"hub id, local folder or s3:// prefix (default: model.source from --config, "
                             f"else {DEFAULT_MODEL})")
    parser.add_argument("--model-revision", default=None)
    parser.add_argument("--resume", action="store_true", help="skip rows already written with status=ok")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (MinIO, Ceph, R2)")
    parser.add_argument("--suffix", action="append", dest="suffixes", default=None,
                        help="with a media prefix as input: only keys ending so (repeatable)")
    parser.add_argument("--modified-since", default=None, help="with a media prefix: ISO date/time")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="items (chunks, pages, prompts) prefilled together in one batch on the GPU "
                             "(batching.max_batch_size); how many are decoded together is batching.decode_slots")
    parser.add_argument("--gpus-per-replica", type=float, default=None, help="0.5: two replicas per GPU")
    parser.add_argument("--max-replicas", type=int, default=None)
    parser.add_argument("--accelerator-type", default=None, help="GPU type for the actor pools, e.g. L40S")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--config", default=None, help="YAML with further JobConfig fields")
    parser.add_argument("--table", default=None, metavar="iceberg://CATALOG/NAMESPACE.TABLE",
                        help="also commit the run's files to this Iceberg table, in one snapshot when the run "
                             "finishes (CATALOG: a SQLite file such as ./catalog.db, glue, or a named catalog)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    if job == "transcribe":
        parser.add_argument("--translate-to", action="append", default=[], metavar="LANG",
                            help="translate the speech too (ISO 639-1; repeatable)")
        parser.add_argument("--summarize", action="store_true", help="also summarise each recording")
    if job in ("transcribe", "meetings"):
        parser.add_argument("--split-channels", action="store_true",
                            help="stereo calls: transcribe each channel (agent/customer) separately")
        parser.add_argument("--max-chunk-s", type=float, default=None)
        parser.add_argument("--summary-window", type=int, default=None, metavar="TOKENS",
                            help="tokens one summary call may hold (default 16384); longer transcripts are "
                                 "summarised in sections, then the section summaries combined")
        parser.add_argument("--summarize-from-audio", action="store_true",
                            help="summarise recordings up to 30 min from the audio itself, not the transcript")
        parser.add_argument("--extract", default=None, metavar="SCHEMA.json",
                            help="JSON Schema (an object) of fields to read from each whole transcript: a "
                                 "task=extract row per recording, its `json` column and a typed column per "
                                 "top-level scalar property")
        parser.add_argument("--extract-prompt", default=None, metavar="TEXT",
                            help="what --extract asks for, before the transcript (default: fill in the "
                                 "schema's fields from what was said)")
    if job == "prompt":
        add_prompt_arguments(parser)
    if job in ("ocr", "prompt"):
        parser.add_argument("--dynamic-hd", type=int, default=None, help="crop cap per page (default 36)")
        parser.add_argument("--pdf-dpi", type=int, default=None)


def config_from_args(job: str, args: argparse.Namespace) -> JobConfig:
    from schemas.config import DEFAULT_MODEL, JobConfig
    from schemas.tasks import TASKS

    data: dict = load_yaml_mapping(args.config) if args.config else {}
    data.update(job=job, input=_local_abspath(args.input), output=_local_abspath(args.output))
    model = dict(data.get("model", {}))
    # --model wins; without it the --config file's model.source is kept (not replaced by the default)
    source = args.model or model.get("source") or DEFAULT_MODEL
    model["source"] = _local_abspath(source) if os.path.exists(source) else source
    if args.model_revision:
        model["revision"] = args.model_revision
    data["model"] = model
    for key in ("resume",):
        if getattr(args, key):
            data[key] = True
    for key, value in (("run_id", args.run_id), ("s3_endpoint", args.s3_endpoint), ("table", args.table),
                       ("manifest_suffixes", args.suffixes), ("modified_since", args.modified_since)):
        if value:
            data[key] = value
    _nested(data, "batching", "max_batch_size", args.batch_size)
    _nested(data, "resources", "gpus_per_replica", args.gpus_per_replica)
    _nested(data, "resources", "max_replicas", args.max_replicas)
    _nested(data, "resources", "accelerator_type", args.accelerator_type)
    if args.max_new_tokens is not None:  # 0 too: refused by the config's check, never the default instead
        data.setdefault("generation", {})["max_new_tokens"] = {
            t: args.max_new_tokens for t in TASKS}
    if job == "transcribe":
        data["translate_to"] = args.translate_to or data.get("translate_to", [])
        data["summarize"] = args.summarize or data.get("summarize", False)
    if job in ("transcribe", "meetings") and args.summarize_from_audio:
        data["summarize"] = True if job == "transcribe" else data.get("summarize", False)
        _nested(data, "audio", "summarize_from_audio", True)
    if job in ("transcribe", "meetings"):
        if args.split_channels:
            _nested(data, "audio", "split_channels", True)
        _nested(data, "audio", "max_chunk_s", args.max_chunk_s)
        _nested(data, "summary", "window_tokens", args.summary_window)
        if args.extract:
            _nested(data, "extract", "json_schema", load_json_file(args.extract, "--extract"))
        elif args.extract_prompt:
            raise ConfigFileError("--extract-prompt needs --extract SCHEMA.json")
        _nested(data, "extract", "instruction", args.extract_prompt)
    if job in ("ocr", "prompt"):
        _nested(data, "image", "dynamic_hd", args.dynamic_hd)
        _nested(data, "image", "pdf_dpi", args.pdf_dpi)
    if job == "prompt":
        prompt_config_from_args(data, args)
    from pydantic import ValidationError

    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(validation_line(exc, flag_labels(job, args), args.config)) from None


def flag_labels(job: str, args: argparse.Namespace) -> dict[tuple[str, str], str]:
    """{config field: the flag (and file) it came from} for the fields this command line set, so that a
    refusal names what the user typed: `--schema call.json: ...`, not `prompt.json_schema`."""
    labels = {}
    if args.max_new_tokens is not None:
        labels[("generation", "max_new_tokens")] = f"--max-new-tokens {args.max_new_tokens}"
    if job in ("transcribe", "meetings") and args.extract:
        labels[("extract", "json_schema")] = f"--extract {args.extract}"
    if job == "prompt":
        if args.schema:
            labels[("prompt", "json_schema")] = f"--schema {args.schema}"
        if args.tools:
            labels[("prompt", "tools")] = f"--tools {args.tools}"
        if args.prompt_file:
            labels[("prompt", "template")] = f"--prompt-file {args.prompt_file}"
        elif args.prompt is not None:
            labels[("prompt", "template")] = "--prompt"
    return labels


def validation_line(exc, labels: dict[tuple[str, str], str] | None = None,
                    source: str | None = None) -> str:
    """Every problem pydantic found (`exc`, a ValidationError), on one line: each after the flag it came from (`labels`), else after
    its field's path, with the config file (`source`) named when a field of it is at fault."""
    labels = labels or {}
    parts, unlabelled = [], False
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        label = labels.get(loc[:2])
        if label is None:
            unlabelled = True
            label = ".".join(loc) or "config"
        parts.append(f"{label}: {message}")
    line = "; ".join(parts)
    if unlabelled:
        line = "invalid configuration: " + line
        if source:
            line = f"{source}: {line}"
    return line


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """`phi4mm prompt`: a prompt over each row's media (the row's `prompt` column wins over these)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--prompt", default=None, metavar="TEXT",
                       help="the prompt, a template: {column} is filled from the row's column")
    which.add_argument("--prompt-file", default=None, metavar="FILE", help="the prompt template from a file")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message")
    parser.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default 1)")
    parser.add_argument("--schema", default=None, metavar="SCHEMA.json",
                        help="JSON Schema (an object) every answer is constrained to: a `json` column, and a "
                             "typed column per top-level scalar property")
    parser.add_argument("--tools", default=None, metavar="TOOLS.json",
                        help="functions the model may call (the card's format: a JSON list of {name, "
                             "description, parameters}); its calls go to the `tool_calls` column")


def prompt_config_from_args(data: dict, args: argparse.Namespace) -> None:
    template = args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                template = f.read().strip()
        except OSError as exc:
            raise ConfigFileError(f"--prompt-file {args.prompt_file}: cannot be read "
                                  f"({exc.strerror or exc})") from exc
    _nested(data, "prompt", "template", template)
    _nested(data, "prompt", "fps", args.fps)
    if args.schema:
        _nested(data, "prompt", "json_schema", load_json_file(args.schema, "--schema"))
    if args.tools:
        tools = load_json_file(args.tools, "--tools")
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise ConfigFileError(f"--tools {args.tools}: must be a JSON list of tool objects")
        _nested(data, "prompt", "tools", tools)
    if args.system is not None:
        data["system_prompt"] = args.system


def load_json_file(path: str, flag: str):
    """The JSON document at `path`; ConfigFileError naming the flag and the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise ConfigFileError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ConfigFileError(f"{flag} {path}: not JSON ({exc})") from exc


def _nested(data: dict, section: str, key: str, value) -> None:
    if value is not None:
        data.setdefault(section, {})[key] = value


def run_job_main(job: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"phi4mm {job}", description=COMMANDS[job])
    add_job_arguments(parser, job)
    args = parser.parse_args(argv)
    return execute(lambda: config_from_args(job, args), quiet=args.quiet)


def execute(make_config, quiet: bool = False) -> int:
    """Build and validate the config, run it, print where the output is. Errors: one clear line."""
    from pydantic import ValidationError

    from jobs import runner
    from jobs.console import native_lines_filtered, quiet_libraries
    from jobs.settings import from_environment
    from jobs.stall import JobStalled
    from pipeline.core.errors import InputError
    from schemas.manifest import ManifestError

    settings = from_environment()
    if quiet:
        settings = dataclasses.replace(settings, progress=False)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(settings.log_level)
    try:
        config = make_config()
    except ValidationError as exc:  # `phi4mm run JOB.yaml` (the subcommands raise ConfigFileError)
        print(f"phi4mm: {validation_line(exc, source=getattr(make_config, 'source', None))}", file=sys.stderr)
        return 2
    except ConfigFileError as exc:
        print(f"phi4mm: {exc}", file=sys.stderr)
        return 2
    try:
        with native_lines_filtered(str(settings.log_level).upper() != "DEBUG"):
            record = runner.run_job(config, settings)
    except (ManifestError, InputError, ValueError, FileNotFoundError) as exc:
        print(f"phi4mm: {exc}", file=sys.stderr)
        return 2
    except JobStalled as exc:  # what was written stays; --resume continues
        print(f"phi4mm: {exc}", file=sys.stderr)
        return 3
    print(json.dumps({"output": config.output, "run_id": record["run_id"], "counts": record["counts"],
                      "wall_s": round(record["wall_s"], 2)}, indent=None))
    return 0


def convert_checkpoint_main(argv: list[str]) -> int:
    """`phi4mm convert-checkpoint SRC DST`: the main-branch (remote-code) checkpoint in the native layout,
    ahead of the jobs (which otherwise convert it once per node on first use)."""
    from jobs.settings import from_environment
    from pipeline.io.storage import StorageOptions
    from pipeline.model.source import convert_to_native

    parser = argparse.ArgumentParser(
        prog="phi4mm convert-checkpoint",
        description="Convert a Phi-4-multimodal-instruct checkpoint in the hub's main-branch (remote-code) "
                    "layout into the native transformers layout. SRC: local folder, s3:// prefix or hub id; "
                    "DST: a new local folder or s3:// prefix.")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--revision", default=None, help="hub revision of SRC (default: the hub's default branch)")
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (MinIO, Ceph, R2)")
    args = parser.parse_args(argv)
    settings = from_environment()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = convert_to_native(args.src, args.dst, revision=args.revision,
                                    options=StorageOptions(endpoint_url=args.s3_endpoint))
    except (ValueError, FileNotFoundError) as exc:
        print(f"phi4mm: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"converted": summary["source"], "to": summary["converted_to"], "layout": "native",
                      "from_layout": summary["layout"], "weights_sha": summary["weights_sha"],
                      "tensors": summary["tensors"], "bytes": summary["bytes"]}))
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("phi4mm-batch")
    except PackageNotFoundError:  # a checkout that was not installed: the version pyproject.toml declares
        import re

        pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        with open(pyproject, encoding="utf-8") as f:
            return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return ("usage: phi4mm COMMAND [ARGS ...]   (phi4mm COMMAND --help for its arguments)\n\n"
            "Phi-4-multimodal-instruct over recordings, documents and prompts on a Ray cluster, written as "
            "partitioned Parquet.\n\ncommands:\n" + "\n".join(lines) + "\n\noptions:\n  -h, --help  this list\n"
            "  --version   the installed version\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv and argv[0] == "--version":
        print(f"phi4mm {version()}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"phi4mm: unknown command {argv[0]!r}", file=sys.stderr)
        print(usage(), end="", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in JOB_COMMANDS:
        return run_job_main(command, rest)
    if command == "report":
        from jobs import report

        return report.main(rest) or 0
    if command == "tiny-model":
        parser = argparse.ArgumentParser(prog="phi4mm tiny-model", description=COMMANDS[command])
        parser.add_argument("dir")
        args = parser.parse_args(rest)
        from actors.tiny_model import build_tiny_model

        print(build_tiny_model(args.dir))
        return 0
    if command == "convert-checkpoint":
        return convert_checkpoint_main(rest)
    parser = argparse.ArgumentParser(prog="phi4mm run", description=COMMANDS[command])
    parser.add_argument("job_yaml")
    parser.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    args = parser.parse_args(rest)

    def from_yaml() -> JobConfig:
        from schemas.config import JobConfig

        data = load_yaml_mapping(args.job_yaml)
        for key in ("input", "output"):
            if key in data:
                data[key] = _local_abspath(str(data[key]))
        source = data.get("model", {}).get("source")
        if source and os.path.exists(source):
            data["model"]["source"] = _local_abspath(source)
        return JobConfig.model_validate(data)

    from_yaml.source = args.job_yaml
    return execute(from_yaml, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
