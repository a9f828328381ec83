"""The text pool: summaries and extractions from whole transcripts, and the combining of a long
transcript's section answers, in rounds that fit the summary window."""
from __future__ import annotations

import pyarrow as pa

from actors.model_stage import ModelStage
from pipeline.context import RunContext
from pipeline.model.inputs import InputBuilder
from pipeline.model.prompts import combine_notes_pieces, combine_pieces, extract_from_notes_pieces
from pipeline.model.transcript_tasks import answer_limits, extract_wording, fitted, split_in_sections
from schemas.work_rows import BatchKey, set_column


class TextStage(ModelStage):
    """Summaries and extractions from transcripts. A row with several chunks (the sections of a transcript
    too long for one window, pipeline/stages/from_transcripts.py) has its sections' answers combined here, in
    rounds that each fit the window: a summary's until one summary is left; an extraction's notes until
    the extraction prompt over them fits, and then the fields are extracted from them under the schema's
    grammar. The row then holds that one answer as its only chunk."""

    modality = "text"
    writes = ModelStage.writes + ("chunk_input_tokens", "chunk_start_s", "chunk_end_s", "chunk_speaker",
                                  "chunk_batch_key")

    def __init__(self, context: RunContext):
        super().__init__(context)
        self.builder = InputBuilder(self.engine.model_dir, self.config.system_prompt,
                                    processor=self.engine.processor)  # the engine's, not a second copy
        self.max_new = answer_limits(self.config)
        self.extract_system, self.fields = extract_wording(self.config)
        self._label_tokens: int | None = None

    def process(self, batch: pa.Table) -> pa.Table:
        return self.combine_sections(super().process(batch))

    def combine_pieces(self, task: str, parts: list[list[int]]) -> list:
        return combine_pieces(parts) if task == "summarize" else combine_notes_pieces(parts, self.fields)

    def extraction(self, notes: list[list[int]]):
        """The extraction prompt over a long transcript's notes (the schema in its system message)."""
        return self.builder.text_pieces(extract_from_notes_pieces(notes, self.config.extract.instruction),
                                        self.extract_system)

    def combine_sections(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["task", "modality", "error", "chunk_text", "chunk_error", "chunk_input_tokens",
                             "chunk_output_tokens", "chunk_output_ids", "chunk_latency_s"]).to_pylist()
        todo = {i: r for i, r in enumerate(rows) if r["modality"] == "text" and r["error"] is None
                and r["task"] in self.max_new and len(r["chunk_text"]) > 1 and not any(r["chunk_error"])
                and None not in r["chunk_text"]}
        if not todo:
            return batch
        tasks = {i: r["task"] for i, r in todo.items()}
        # each answer as the ids generated for it (pipeline/model/inputs.py: text_pieces), so a round's
        # prompt length is known without tokenising anything, and its text for the last one
        summaries = {i: [self.builder.prompt_ids(ids) for ids in r["chunk_output_ids"]] for i, r in todo.items()}
        texts = {i: list(r["chunk_text"]) for i, r in todo.items()}
        totals = {i: [sum(r["chunk_input_tokens"]), sum(r["chunk_output_tokens"]), sum(r["chunk_latency_s"])]
                  for i, r in todo.items()}
        failed: dict[int, str] = {}
        ids = batch["id"].to_pylist()
        window = self.config.summary.window_tokens
        limit = {task: window - n for task, n in self.max_new.items()}  # prompt tokens one call may hold

        def needs_round(i: int) -> bool:
            if tasks[i] == "summarize":
                return len(summaries[i]) > 1
            return self.extraction(summaries[i]).input_tokens > limit["extract"]

        def run(work: list, grammar: str | None = None, what: str = "combining the section answers") -> None:
            """Generate for (row, built prompt) pairs; each row's answers replace its parts."""
            if not work:
                return
            gens = self.engine.generate([b.inputs for _, b in work], [b.batch_key for _, b in work],
                                        [self.max_new[tasks[i]] for i, _ in work], self.config.benchmark.min_new_tokens,
                                        [grammar] * len(work) if grammar else None)
            self.counters["combine_items"] += len(work)
            fresh: dict[int, list[tuple[list[int], str]]] = {}
            for (i, built), gen in zip(work, gens):
                if isinstance(gen, Exception):
                    failed.setdefault(i, f"{ids[i]}: {what} failed ({type(gen).__name__}: {gen})")
                    continue
                fresh.setdefault(i, []).append((self.builder.prompt_ids(gen.token_ids), gen.text))
                totals[i][0] += built.input_tokens
                totals[i][1] += len(gen.token_ids)
                totals[i][2] += gen.latency_s
            for i, made in fresh.items():
                if i not in failed:
                    summaries[i], texts[i] = [p for p, _ in made], [t for _, t in made]

        while pending := [i for i in summaries if i not in failed and needs_round(i)]:
            work = []  # (row, items of this round)
            for i in pending:
                task, parts = tasks[i], summaries[i]
                overhead = self.builder.text_pieces(self.combine_pieces(task, [])).input_tokens
                counts = [len(p) + self.part_label_tokens for p in parts]
                stuck = (f"{ids[i]}: the section {'summaries' if task == 'summarize' else 'notes'} cannot be "
                         f"combined within the summary window of {window} tokens: raise --summary-window")
                try:
                    groups = fitted(split_in_sections(parts, counts, limit[task] - overhead, lambda p, n: [p]),
                                    lambda g: self.builder.text_pieces(self.combine_pieces(task, g)), limit[task])
                except ValueError:
                    groups = []
                if not groups or len(groups) == len(parts):  # combining would not converge
                    failed[i] = stuck
                    continue
                work += [(i, built) for _, built in groups]
            run(work)
        # the extractions: their notes fit one prompt now; the answer follows the schema
        run([(i, self.extraction(summaries[i])) for i in summaries if tasks[i] == "extract" and i not in failed],
            self.answer_grammar, "extracting the fields from the section notes")
        columns = {name: batch[name].to_pylist() for name in self.writes}
        for i in todo:
            final = texts[i][0] if i not in failed else None
            one = {"chunk_text": final, "chunk_input_tokens": totals[i][0], "chunk_output_tokens": totals[i][1],
                   "chunk_output_ids": summaries[i][0] if i not in failed else None,
                   "chunk_latency_s": totals[i][2], "chunk_error": failed.get(i), "chunk_inputs": None,
                   "chunk_start_s": None, "chunk_end_s": None, "chunk_speaker": None,
                   "chunk_batch_key": BatchKey("text", 0)._asdict()}
            for name, value in one.items():
                columns[name][i] = [value]
        for name, values in columns.items():
            batch = set_column(batch, name, values)
        return batch

    @property
    def part_label_tokens(self) -> int:
        """Tokens of the widest "\n\nPart k: " label between summaries (pipeline/model/prompts.py), an estimate
        for grouping only: the prompt as built is what is checked against the window."""
        if self._label_tokens is None:
            self._label_tokens = len(self.builder.token_ids("\n\nPart 999: "))
        return self._label_tokens
