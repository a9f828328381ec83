"""Typed job configuration. Everything a run needs is here, validated before Ray or a GPU starts."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schemas.languages import language_name
from schemas.results import RESULT_COLUMNS
from schemas.structured import SchemaFileError, check_output_schema, grammar_problem
from schemas.table_uri import parse_table_uri
from schemas.tasks import TASKS, job_tasks
from schemas.templates import TemplateError, template_parts

JobName = Literal["transcribe", "ocr", "meetings", "prompt"]

DEFAULT_MODEL = "microsoft/Phi-4-multimodal-instruct"
DEFAULT_REVISION = "refs/pr/70"  # the hub branch that holds the native transformers format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Which checkpoint every replica loads, and how."""
    source: str = Field(DEFAULT_MODEL, description="hub id, local folder or s3:// prefix")
    revision: str | None = Field(None, description=(
        "None: DEFAULT_REVISION for the default hub id, else the hub's default"))
    cache_dir: str | None = Field(None, description="where s3:// checkpoints are copied, once per node")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "auto: bf16 on GPU, fp32 on CPU"))
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field("auto", description=(
        "the text decoder's attention kernel; auto: flash_attention_2 when installed on a GPU, else sdpa"))
    merge_adapters: bool = Field(True, description=(
        "merge the modality's LoRA into the base weights (no per-token cost)"))

    def resolved_revision(self) -> str | None:
        if self.revision is None and self.source == DEFAULT_MODEL:
            return DEFAULT_REVISION
        return self.revision


class GenerationConfig(_Strict):
    """Greedy decoding limits per task (the model card decodes greedily)."""
    max_new_tokens: dict[str, int] = Field(default_factory=lambda: {
        "asr": 256, "translate": 320, "ocr": 1024, "summarize": 512, "extract": 512, "prompt": 512},
        description="most new tokens per answer, by task (a longer answer is cut there)")

    @field_validator("max_new_tokens")
    @classmethod
    def _limits(cls, value: dict[str, int]) -> dict[str, int]:
        for task, tokens in value.items():
            if task not in TASKS:
                raise ValueError(f"{task!r} is not a task (tasks: {', '.join(TASKS)})")
            if tokens < 1:
                raise ValueError(f"{tokens} new tokens for {task}: an answer needs at least 1")
        return value


class BatchingConfig(_Strict):
    """How work is grouped on the GPU actors."""
    rows_per_call: int = Field(512, ge=1, description=(
        "work rows (recording x task, or page) per actor call; with decode_slots, what one GPU call holds in "
        "flight (512: +10 % asr throughput over 256 on an H200, bench/RESULTS.md)"))
    meeting_rows_per_call: int = Field(32, ge=1, description=(
        "the same for the meetings job, whose work row is one part of a recording (up to audio.part_chunks, "
        "16, chunks of ~1 MB of features each), so 32 rows make a call of ~512 chunks like rows_per_call's"))
    vision_call_bytes: int = Field(4 << 30, ge=1 << 20, description=(
        "prepared image features one vision call may carry (the vision pool's calls are sized by bytes, not "
        "by `rows_per_call`, which is tuned for 30 s audio chunks of ~1 MB each): rows per vision call = this"
        " / the most one page's features can take under `image.dynamic_hd` ((dynamic_hd + 1) crops of "
        "3x448x448 float32: 89 MB at the default 36; a Letter page at 150 dpi is 13 crops, 31 MB), at most "
        "`rows_per_call`. 4 GiB: 48 pages a call, each with its own decode slot"))
    cpu_vision_rows_per_call: int = Field(2, ge=1, description=(
        "pages per vision call of a replica on CPU (gpus_per_replica 0, or no GPU: the tiny model, tests): a "
        "CPU gains nothing from batching pages (the tiny model reads 8 Letter pages 30 % faster in batches of"
        " 2 than of 8) and each page of a batch holds ~100 MB of activations there (2 rather than 4: the "
        "300-page PDF's replica peaked 0.4 GB lower)"))
    queued_calls_per_replica: int = Field(3, ge=1, description=(
        "calls' worth of prepared features the object store may hold per GPU replica (what the pool takes "
        "soon: the call running and the one queued behind it, plus one being formed); Ray Data holds the CPU "
        "stages back past it, so a fast prepare pool never piles up pages the GPU is hours from reading"))
    max_batch_size: int = Field(64, ge=1, description=(
        "sequences prefilled (or, with `generate`, decoded) together; 64: the fused asr prefill measured 9.56"
        " -> 8.74 ms per 30 s clip on an H200 from 32 to 64 (longer prompts are held by max_batch_tokens)"))
    max_batch_tokens: int = Field(65536, ge=512, description="prompt tokens in one prefill batch (memory bound)")
    decoder: Literal["auto", "static", "generate"] = Field("auto", description=(
        "\"static\": static KV cache, decode step as a CUDA graph, finished slots refilled (continuous "
        "batching); \"generate\": transformers' generate per batch; \"auto\": static on GPU, generate on CPU"))
    decode_slots: int = Field(512, ge=1, description=(
        "sequences decoded together (fewer when the KV cache does not fit)"))
    kv_cache_fraction: float = Field(0.5, gt=0.0, le=0.9, description="of free GPU memory, for the static cache")
    check_every: int = Field(8, ge=1, description="decode steps between looks for finished slots")
    prefill: Literal["auto", "fused", "model"] = Field("auto", description=(
        "the static decoder's prefill: \"fused\" runs the text decoder as one compiled function per layer "
        "after the model's own encoders (actors/fast_prefill.py); \"model\" runs the model's forward; "
        "\"auto\": fused on GPU, model on CPU"))
    grammar_pipeline: Literal["auto", "on", "off"] = Field("auto", description=(
        "Constrained (--schema) decode steps with the host's grammar work (filling the next masks, the "
        "matchers taking the chosen tokens) run while the GPU computes the next step's forward, the masks "
        "through pinned memory and the mask+choice as a CUDA graph (actors/grammar_pipeline.py); 'off': "
        "the serial step (forward, masks, choice, then the host); 'auto': pipelined on CUDA."))
    grammar_threads: int = Field(0, ge=0, le=256, description=(
        "Threads llguidance fills masks and consumes tokens with, per GPU replica; 0: 80 % of the CPUs "
        "the replica's process may run on, 1 to 32."))
    # the fused prefill's levers (actors/fast_prefill.py PrefillOptions), each switchable for benchmarks
    prefill_compile: Literal["auto", "tokens", "dynamic", "off"] = Field("auto", description=(
        "how the fused prefill's layer halves are compiled: 'tokens' over flattened tokens with the token "
        "count the only runtime size (one graph for every batch and width, constant index arithmetic); "
        "'dynamic' with every size a runtime symbol (the first version: its rotary kernels ran ~10x under "
        "memory bandwidth); 'off' eager; 'auto' = tokens on CUDA, off elsewhere"))
    prefill_gqa: bool = Field(True, description=(
        "the fused prefill's attention reads the grouped K/V heads (SDPA enable_gqa) instead of copying "
        "them to every query head"))
    prefill_unpad: bool = Field(True, description=(
        "left-padded prompts of a fused prefill batch are realigned to start at position 0, so plain "
        "causal (flash) attention is exact and no dense [batch, tokens, tokens] mask is built"))
    vision_encoder: Literal["auto", "compiled", "eager", "model"] = Field("auto", description=(
        "image features: 'compiled'/'eager' run SigLIP only up to the feature layer with a fused QKV and "
        "per-layer functions (torch.compile'd or not) and bidirectional attention on every crop "
        "(actors/vision_encoder.py); 'model' the model's own get_img_features; 'auto' = compiled on "
        "CUDA, model elsewhere"))
    # the speech encoder: "packed" runs actors/audio_encoder.py (clips packed end to end, FlexAttention,
    # compiled on CUDA; each clip's output is its unbatched one); "model" runs the model's own forward with
    # the padding of mixed lengths masked (actors/audio_padding.py); "auto": packed on GPU, model on CPU
    audio_encoder: Literal["auto", "packed", "model"] = Field("auto", description=(
        "Speech encoder: 'packed' (clips packed on time, FlexAttention, compiled on CUDA), 'model' (the "
        "model's forward, padding masked), 'auto' (packed on GPU, model on CPU)."))
    # prompt tokens (audio placeholders + text) in one prefill batch of single-clip audio items of any
    # lengths: short chunks fill a batch instead of stopping at max_batch_size (about 64 clips of 30 s,
    # ~390 tokens each). None: audio batches by length bucket (the batch key) and max_batch_size
    audio_batch_tokens: int | None = Field(25_000, ge=512, description=(
        "Prompt tokens per prefill batch of audio clips of mixed lengths (the static decoder); None batches "
        "audio by length bucket and max_batch_size."))
    decode_step: Literal["auto", "compiled", "eager"] = Field("auto", description=(
        "The static decoder's step: 'compiled' fuses each layer's elementwise work (norms, rotary, softmax, "
        "SiLU, residuals) with torch.compile inside the captured CUDA graphs (actors/decode_step.py); "
        "'eager' runs the same functions op by op; 'auto': compiled on CUDA. A compile failure logs one "
        "warning and the replica decodes eagerly."))
    decode_attention: Literal["auto", "flex", "matmul"] = Field("auto", description=(
        "Attention in the compiled decode step: 'matmul' (and 'auto'): two grouped matmuls over the attended "
        "columns and a fused softmax; 'flex': FlexAttention's decoding kernel over each slot's cache blocks up "
        "to its position. Measured on one H200 (bench.suite, 2026-12-04): flex 13.6 ms/step at 128 asr slots "
        "and 16.8 at 16 ocr slots, matmul 5.7 and 6.0, so flex is opt-in. A failure logs one warning and the "
        "replica attends with matmuls."))
    decode_length_bucket: int = Field(256, ge=0, description=(
        "A decode step attends only the cache columns up to the highest position of the occupied slots, "
        "rounded up to a multiple of this (one CUDA graph per length met); 0: every step reads the whole "
        "cache. Exact either way (the columns left out are masked)."))
    decode_row_buckets: bool = Field(True, description=(
        "A decode step computes only the slots up to the highest occupied one (rounded up to a power of "
        "two) instead of all the cache's slots (one CUDA graph per width met)."))
    pinned_inputs: bool = Field(True, description=(
        "On CUDA: prefill batches are collated with the features already in the model's dtype, in pinned "
        "memory, and copied to the GPU asynchronously (the same values as casting on the GPU)."))
    warm_up: bool = Field(True, description=(
        "Each GPU replica, when it starts, builds the static cache its calls will use, compiles the prefill "
        "and the decode step and captures the decode graphs on dummy items of the job's shapes "
        "(actors/warm_up.py), counted as the engine's warmup_s instead of in the first call."))


class AudioConfig(_Strict):
    max_chunk_s: float = Field(30.0, gt=1.0, le=40.0, description="the model is trained on clips up to ~40 s")
    grid_s: float = Field(0.5, gt=0.0, description=(
        "long audio's cuts prefer points on this grid (fewer distinct lengths)"))
    batch_bucket_s: float = Field(2.0, gt=0.0, le=40.0, description=(
        "clips and chunks batch on the GPU by length bucket of this width (pipeline/model/inputs.py: "
        "audio_bucket): wider buckets form fuller batches, narrower ones pad less"))
    split_channels: bool = Field(False, description=(
        "stereo call recordings: one transcript per channel (agent/customer)"))
    reject_no_speech: bool = Field(True, description="a clip where the VAD finds no speech becomes an error row")
    summarize_from_audio: bool = Field(False, description=(
        "summaries of recordings up to 30 min from the audio itself"))
    max_summary_audio_s: float = Field(1800.0, description=(
        "longest recording summarised from its audio (with summarize_from_audio); longer ones are summarised "
        "from the transcript"))
    max_audio_s: float = Field(4 * 3600.0, gt=0.0, description=(
        "longest recording accepted (4 h): a longer one is an error row, refused from the file's header "
        "before it is decoded where the header says its length (an 8 h FLAC of silence is 0.7 MB to send and "
        "~1.8 GB of 16 kHz samples to hold), and when the decoded samples pass it otherwise"))
    part_chunks: int = Field(16, ge=1, description=(
        "chunks per work row: a longer recording's row travels in parts of this many chunks (~1 MB of "
        "features each), regrouped after the GPU (pipeline/stages/regroup_parts.py), so no Ray object holds "
        "an hour"))


class SummaryConfig(_Strict):
    """Summaries of whole recordings."""
    window_tokens: int = Field(16384, ge=256, le=131072, description=(
        "tokens one summary call may hold, prompt and summary together; a longer transcript is cut at segment"
        " boundaries into sections, each summarised, then the section summaries summarised (recursively)"))


class ImageConfig(_Strict):
    max_pixels: int = Field(40_000_000, ge=10_000, description="decompression-bomb guard per page")
    pdf_dpi: int = Field(150, ge=36, le=600, description="resolution PDF pages are rendered at")
    max_pages: int | None = Field(None, ge=1, description=(
        "pages read per document (the rest are error rows that say so); None: every page"))
    dynamic_hd: int = Field(36, ge=1, le=64, description="crop cap: fewer crops trade detail for speed")


def checked_answer_schema(value: dict | None, info: ValidationInfo) -> dict | None:
    """A --schema / --extract JSON Schema checked (schemas/structured.py): valid, its columns clear of the
    result columns, and one the grammar engine can enforce under the section's bounds (validated before
    it, in `info.data`); the message names the keyword and where it is, when it is not usable."""
    if value is None:
        return None
    try:
        schema = check_output_schema(value, reserved=tuple(RESULT_COLUMNS))
    except SchemaFileError as exc:
        raise ValueError(str(exc)) from None
    bounds = [info.data.get(k) for k in ("max_string_chars", "max_array_items", "number_decimals")]
    if None not in bounds:  # (a bound that failed its own check is reported on its own)
        problem = grammar_problem(schema, *bounds)
        if problem:
            raise ValueError(problem)
    return schema


def tool_problem(tool: dict, number: int, names: list[str]) -> str | None:
    """Why one --tools entry cannot be listed for the model, or None. `parameters` is either the card's
    format (each parameter's name mapped to its {"type", "description"}) or a JSON Schema of an object."""
    name = tool.get("name")
    if not isinstance(name, str) or not name.strip():
        return (f'tool {number} has no "name" (the card\'s format: a JSON list of {{"name", "description", '
                '"parameters"}})')
    if name in names:
        return f"tool {number}: the name {name!r} is tool {names.index(name) + 1}'s too; a call could not say which"
    params = tool.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        return (f'tool {name!r}: "parameters" is a {type(params).__name__}, not an object (each parameter\'s '
                'name mapped to its {"type", "description"}, or a JSON Schema with "type": "object")')
    if isinstance(params.get("type"), str):  # a JSON Schema (the card's format has no string "type" here)
        from jsonschema import SchemaError
        from jsonschema.validators import validator_for

        if params["type"] != "object":
            return f'tool {name!r}: "parameters" is a JSON Schema of type {params["type"]!r}, not "object"'
        try:
            validator_for(params).check_schema(params)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            return f'tool {name!r}: "parameters" is not a valid JSON Schema: {exc.message}' + \
                (f" (at {where})" if where else "")
        return None
    for param, spec in params.items():
        if not isinstance(spec, dict):
            return (f'tool {name!r}: parameter {param!r} is described by a {type(spec).__name__}, not an object '
                    '({"type", "description"})')
    return None


class AnswerBounds(_Strict):
    """What the answer grammar adds where a --schema / --extract schema sets no bound, so a wandering model
    still ends within its tokens (schemas/structured.py: generation_schema); validated before the schema,
    whose check reads them."""
    max_string_chars: int = Field(2000, ge=1, description=(
        "longest string the answer grammar allows where the schema sets no maxLength"))
    max_array_items: int = Field(64, ge=1, description=(
        "most array items the answer grammar allows where the schema sets no maxItems"))
    number_decimals: int = Field(6, ge=0, le=15, description=(
        "digits after the point of a number in an answer, where the schema sets no multipleOf (numbers also "
        "stay within +-1e15 and integers within +-9e18)"))


class PromptConfig(AnswerBounds):
    """The prompt job (`phi4mm prompt`): one prompt per manifest row over any mix of its media."""
    template: str | None = Field(None, description=(
        "the prompt when a row has no `prompt` column value: `{column}` placeholders are filled from the row "
        "(a row without that column is an error row naming it); `{{` / `}}` are literal braces"))
    fps: float = Field(1.0, gt=0.0, le=30.0, description="video frames sampled per second")
    max_frames: int = Field(64, ge=1, le=64, description="frames per video at most (evenly spread when longer)")
    frame_max_side: int = Field(448, ge=14, le=1344, description=(
        "longest side of a video frame: a 448 px frame is one crop (+ the global one, ~545 tokens), so 64 "
        "frames stay near 35k prompt tokens, inside the model's context"))
    max_images: int = Field(64, ge=1, le=256, description="images of one prompt (a document's pages included)")
    max_audio_s: float = Field(1800.0, gt=0.0, description="longest audio of a prompt (30 min: ~22.5k tokens)")
    json_schema: dict | None = Field(None, description=(
        "--schema: the JSON Schema (an object at the top) every answer is constrained to "
        "(schemas/structured.py), checked under the bounds of AnswerBounds"))
    tools: list[dict] | None = Field(None, description=(
        "--tools: the functions the model may call, in the card's format ({\"name\", \"description\", "
        "\"parameters\"}), listed in the system message; its calls land in `tool_calls`"))
    modalities: list[Literal["speech", "vision", "text"]] | None = Field(None, description=(
        "which GPU pools the run needs, from the manifest's media (the driver fills it: jobs/runner.py); "
        "None: all three"))

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                template_parts(value)
            except TemplateError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[dict] | None) -> list[dict] | None:
        names: list[str] = []
        for k, tool in enumerate(value or []):
            problem = tool_problem(tool, k + 1, names)
            if problem:
                raise ValueError(problem)
            names.append(tool["name"])
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict | None, info: ValidationInfo) -> dict | None:
        return checked_answer_schema(value, info)


class ExtractConfig(AnswerBounds):
    """`transcribe` / `meetings --extract SCHEMA.json`: an `extract` row per recording, the schema's fields
    read from its whole transcript by the text pool, generation constrained to the schema, the answer in
    `json` and each top-level scalar property in a typed column (schemas/structured.py). A transcript
    longer than `summary.window_tokens` is read in sections (notes on the fields per section, combined
    like summaries), then the fields are extracted from the notes."""
    instruction: str | None = Field(None, description=(
        "what to ask for, before the transcript (`--extract-prompt`); None: the project's wording "
        "(pipeline/model/prompts.py: EXTRACT_TRANSCRIPT_PROMPT)"))
    json_schema: dict | None = Field(None, description=(
        "the JSON Schema (an object at the top) of what to extract, checked under the bounds of AnswerBounds; "
        "None: no extract rows"))

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: dict | None, info: ValidationInfo) -> dict | None:
        return checked_answer_schema(value, info)


# schemes a manifest's uris may use unless the operator says otherwise: local files and the object stores
# a nightly job reads its recordings from. Not http(s): a uri in a manifest must not make a worker inside
# the network fetch an internal endpoint (metadata services, admin pages) on the manifest author's behalf.
DEFAULT_ALLOWED_SCHEMES = ("file", "s3", "s3a", "gs", "gcs")


class InputsConfig(_Strict):
    """What a manifest's `uri`s may make a worker read, and how long one read may take.

    A uri outside these rules, or a read that passes its deadline, becomes an error row for that input
    (the message names the rule or the timeout); the other rows go on. Rows with `data` read nothing.
    """
    allowed_schemes: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_SCHEMES), description=(
        "uri schemes a worker may read (\"file\" covers plain paths and file:// uris); add \"https\" to fetch"
        " web uris, \"memory\" for fsspec's in-memory filesystem"))
    allowed_prefixes: list[str] | None = Field(None, description=(
        "when set, every uri must lie under one of these: \"s3://calls-in/\", \"/mnt/recordings\" (local "
        "paths are compared after symlinks and \"..\" are resolved); None: anywhere the schemes allow. Local "
        "paths under /proc, /sys and /dev are refused whatever this says."))
    connect_timeout_s: float = Field(10.0, gt=0.0, description="to open a connection to S3 / an HTTP server")
    read_timeout_s: float = Field(60.0, gt=0.0, description="with no byte arriving from an open connection")
    fetch_timeout_s: float = Field(300.0, gt=0.0, description=(
        "the whole fetch of one input, retries included; past it the row is an error and the read is left to "
        "its thread (at most `pipeline.io.fetch.MAX_STALLED_READS` of them per worker)"))

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, value: list[str]) -> list[str]:
        out = []
        for scheme in value:
            scheme = scheme.strip().lower().removesuffix("://")
            if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
                raise ValueError(f"allowed_schemes: {scheme!r} is not a uri scheme (e.g. s3, file, https)")
            if scheme not in out:
                out.append(scheme)
        return out

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for prefix in value:
            if not prefix or not prefix.strip():
                raise ValueError("allowed_prefixes: an empty prefix would allow everything; leave the field "
                                 "unset (null) for that")
            if "://" not in prefix and not prefix.startswith(("/", "~")):
                # a worker would resolve it against its own working directory, not the driver's
                raise ValueError(f"allowed_prefixes: {prefix!r} is a relative path; give a bucket as "
                                 f"s3://{prefix} or a local folder as an absolute path")
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> "InputsConfig":
        if self.fetch_timeout_s < self.connect_timeout_s:
            raise ValueError(f"fetch_timeout_s ({self.fetch_timeout_s}) is shorter than connect_timeout_s "
                             f"({self.connect_timeout_s}): no fetch could ever connect")
        return self


class ResourcesConfig(_Strict):
    """Actor pools: Ray Data sizes them between min and max from the cluster's resources."""
    gpus_per_replica: float = Field(1.0, ge=0.0, description="0.5 puts two replicas on one GPU; 0 runs on CPU")
    min_replicas: int = Field(1, ge=1, description="GPU replicas each pool starts with")
    max_replicas: int | None = Field(None, ge=1, description="None: as many as the cluster has GPUs for")
    autoscale_max_replicas: int = Field(16, ge=1, description="joining a cluster: how far pools may grow")
    accelerator_type: str | None = Field(None, description=(
        "e.g. \"L40S\", \"H100\": which GPU nodes the autoscaler adds"))
    cpus_per_prepare_task: float = Field(1.0, gt=0.0, description="CPUs each decoding worker reserves")
    poison_after_deaths: int = Field(2, ge=1, description=(
        "a work row whose GPU worker process died while it was generating alone this many times becomes an "
        "error row without running again (a poison input); the rest of its batch is retried and finishes"))
    stall_timeout_s: float | None = Field(1200.0, gt=0.0, description=(
        "a run whose progress (any stage's counters) has not moved for this long stops with one line naming "
        "the stage that holds the work and what it waits for (e.g. a GPU replica no node can hold), exit code"
        " non-zero; what was written stays and --resume continues. 20 min is longer than any one GPU call at "
        "the largest sizes; a first model download on a slow link may need more. None: wait forever"))


class BenchmarkConfig(_Strict):
    """Knobs for benchmarks and stress tests, not for production runs: they change what is computed."""
    random_weights: bool = Field(False, description=(
        "the checkpoint's config with random weights made on the device (real shapes, no weights read)"))
    min_new_tokens: int = Field(0, ge=0, description=(
        "decode at least this many tokens per item: with min == max every engine does the same work"))
    new_tokens_per_30s: int | None = Field(None, ge=1, description=(
        "audio: decode exactly this many tokens per 30 s of a chunk's length bucket instead (a 7.3 s call on "
        "the 2 s grid: 8 s -> 27 of 100), so calls of every length cost what their audio would"))
    exit_worker_on_ids: list[str] = Field(default_factory=list, description=(
        "fault injection, for tests only: a GPU stage whose call includes a row with one of these ids ends "
        "its own process (os._exit), as a segfaulting kernel or an OOM kill would"))
    write_delay_s: float = Field(0.0, ge=0.0, description=(
        "fault injection, for tests only: every write call of a local result file sleeps this long first, so "
        "that a kill can land while a Parquet file is half written"))


class JobConfig(_Strict):
    """One run of one job. `phi4mm run JOB.yaml` reads this from YAML; the subcommands build it."""
    job: JobName = Field(description="which job runs: transcribe, ocr, meetings or prompt")
    input: str = Field(description=(
        "the manifest (Parquet file/folder/glob, CSV, JSON Lines; local or s3://) or a media prefix"))
    output: str = Field(description=(
        "the output dataset folder (local or s3://): OUTPUT/task=<task>/*.parquet and _runs/<run_id>.json"))
    translate_to: list[str] = Field(default_factory=list, description=(
        "target languages (ISO 639-1) of a translate row per recording (transcribe only)"))
    summarize: bool = Field(False, description=(
        "also write a summarize row per recording (transcribe; meetings always summarise)"))
    resume: bool = Field(False, description=(
        "skip (id, task, page) already written with status=ok; error rows are redone and replaced"))
    run_id: str = Field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                        + "-" + uuid.uuid4().hex[:6], description=(
        "names this run's files and its _runs/<run_id>.json (a plain file name); default: UTC time + random"))
    system_prompt: str | None = Field(None, description=(
        "system message of every prompt (None: the model card's default)"))
    s3_endpoint: str | None = Field(None, description=(
        "S3-compatible endpoint (MinIO, Ceph, R2) for every s3:// read and write; None: AWS (or "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, read once on the driver)"))
    manifest_suffixes: list[str] | None = Field(None, description=(
        "with a media prefix as input: only keys ending in one of these (e.g. .wav)"))
    modified_since: datetime | None = Field(None, description=(
        "with a media prefix as input: only objects modified at or after this time"))
    model: ModelConfig = Field(default_factory=ModelConfig, description="the checkpoint every replica loads")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description=(
        "greedy decoding limits per task"))
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description=(
        "how work is grouped on the GPU replicas"))
    audio: AudioConfig = Field(default_factory=AudioConfig, description="decoding and chunking of recordings")
    image: ImageConfig = Field(default_factory=ImageConfig, description="decoding of images and documents")
    summary: SummaryConfig = Field(default_factory=SummaryConfig, description="summaries of whole transcripts")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description=(
        "the prompt job's template, media limits, --schema and --tools"))
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description=(
        "--extract: fields read from each whole transcript under a JSON Schema"))
    inputs: InputsConfig = Field(default_factory=InputsConfig, description=(
        "what a manifest's uris may make a worker read, and how long one read may take"))
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description=(
        "GPU replicas, CPU pools and the run's fault limits"))
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description=(
        "benchmark and fault-injection knobs (they change what is computed: not for production)"))
    table: str | None = Field(None, description=(
        "an Iceberg table the run's result files are committed to when the run finishes, all in one snapshot "
        "(the Parquet output is written as without it): iceberg://CATALOG/NAMESPACE.TABLE, CATALOG a SQLite "
        "file (iceberg://./catalog.db/calls.results, made on first use), `glue`, or a catalog named in "
        "pyiceberg's configuration (a REST catalog); None: the Parquet output only"))
    table_catalog: dict[str, str] = Field(default_factory=dict, exclude=True, description=(
        "catalog properties for `table`, added to pyiceberg's own configuration of CATALOG and winning over "
        "it, e.g. {uri: https://catalog.example/api, warehouse: lake}; the s3.endpoint and s3.region of its "
        "files default to the run's S3 endpoint. Kept out of the run record (it may hold a credential: "
        "better given as PYICEBERG_CATALOG__<NAME>__CREDENTIAL)"))

    @field_validator("table")
    @classmethod
    def _table(cls, value: str | None) -> str | None:
        return None if value is None else parse_table_uri(value).uri

    @field_validator("translate_to")
    @classmethod
    def _languages(cls, value: list[str]) -> list[str]:
        out = []
        for code in value:
            language_name(code)  # raises ValueError naming the unknown code
            if code not in out:
                out.append(code)
        return out

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ =") or value.startswith(("_", ".")):
            raise ValueError(f"run_id {value!r} must be a plain file name (no '/', '=', spaces)")
        return value

    @model_validator(mode="after")
    def _job_tasks(self) -> "JobConfig":
        if self.job != "transcribe" and self.translate_to:
            raise ValueError(f"--translate-to applies to the transcribe job, not {self.job}")
        if self.job not in ("transcribe", "meetings") and self.extract.json_schema is not None:
            raise ValueError(f"--extract applies to the transcribe and meetings jobs, not {self.job} "
                             "(the prompt job takes --schema)")
        return self

    @property
    def tasks(self) -> list[str]:
        """The tasks this run writes, each a partition of the output (schemas/tasks.py)."""
        return job_tasks(self.job, self.translate_to, self.summarize, self.extract.json_schema is not None)

    @property
    def structured_task(self) -> str | None:
        """The task whose answers follow a JSON Schema in this run ("prompt" with --schema, "extract"
        with --extract), or None."""
        if self.job == "prompt":
            return "prompt" if self.prompt.json_schema is not None else None
        return "extract" if self.extract.json_schema is not None else None

    @property
    def output_bounds(self) -> tuple[int, int, int]:
        """(max_string_chars, max_array_items, number_decimals) the answer grammar adds where the schema
        sets none (schemas/structured.py: generation_schema's arguments after the schema)."""
        section = self.prompt if self.job == "prompt" else self.extract
        return section.max_string_chars, section.max_array_items, section.number_decimals

    @property
    def output_schema(self) -> dict | None:
        """The JSON Schema of `structured_task`'s answers (its typed columns are this run's), or None."""
        return self.prompt.json_schema if self.job == "prompt" else self.extract.json_schema
