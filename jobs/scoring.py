"""Quality scores for result rows that carry a reference text (pure functions, no I/O).

Which rows are scored, and why:

* Only rows with a non-empty reference. The reference of a row is the manifest's pass-through
  `reference` column, or `reference_<task>` (e.g. `reference_translate`) when the manifest has one,
  because a single `reference` column cannot be right for every task of the same input.
* Only `status == "ok"` rows. Error rows that had a reference are counted (`errors`) instead: they say
  how much of the test set the score does not cover, which a score alone would hide.
* A `translate` or `summarize` row whose reference is the very text the `asr` row of the same input
  carries is skipped (`skipped_transcript_reference`): the pass-through column copies one reference to
  every task, and a transcript is not a translation or a summary, so scoring against it would be noise.
* `ocr`: a manifest reference belongs to the whole document while rows are per page, so pages of one
  document that share the same reference are joined (page order, newline) and scored as one
  document; a document with an error page is not scored (its ok pages count as `skipped_incomplete`).

Metrics and units:

* `asr`: WER and CER as fractions (0.12 = 12 %), corpus-level (total edits / total reference words or
  characters), so long recordings weigh by their length. For languages written without spaces
  (zh, ja, th) WER is meaningless and CER is the number to read.
* `translate`: sacrebleu corpus BLEU and chrF (0-100). BLEU's tokenizer follows the target language
  (`zh` for Chinese, `char` for Japanese/Thai, `13a` otherwise); a corpus mixing tokenizers falls back
  to `13a` and says so in `tokenize`. Per row: sentence BLEU and chrF (chrF ranks the worst rows,
  being far steadier than sentence BLEU).
* `ocr`: CER (and WER) as for asr.
* `summarize`: ROUGE-1/2/L F1 (0-1), mean over rows. English (or unknown language) uses rouge-score's
  own tokenizer with the Porter stemmer, the usual setting; other languages use a Unicode tokenizer
  (rouge-score's default drops every non-ASCII letter), one token per CJK/Thai character.

Normalisation before WER/CER (`normalize_text`): Unicode NFKC, case-folded, apostrophes removed
("don't" -> "dont"), every other punctuation character replaced by a space, whitespace collapsed.
Deliberately light: no number spelling, no filler-word removal, so scores stay comparable across runs
and languages but are somewhat higher than those of Whisper-style English normalisers.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

# jiwer, sacrebleu and rouge-score are imported where a metric is computed: a run whose rows carry no
# reference (most nightly runs) records itself without loading them

UNKNOWN = "unknown"
# Per-row metric that ranks the worst rows of each task, and whether a higher value is worse.
RANK_METRIC: dict[str, tuple[str, bool]] = {
    "asr": ("wer", True),
    "translate": ("chrf", False),
    "ocr": ("cer", True),
    "summarize": ("rougeL", False),
}
ROW_COLUMNS = ["id", "task", "page", "language", "target_language", "metric", "score",
               "wer", "cer", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "text", "reference"]

_APOSTROPHES = re.compile(r"['\u2019\u02bc`]")
_SPACES = re.compile(r"\s+")
_CHAR_SCRIPTS = r"\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNICODE_TOKEN = re.compile(rf"[{_CHAR_SCRIPTS}]|[^\s{_CHAR_SCRIPTS}]+")


def normalize_text(text: Any) -> str:
    """Lowercase, drop punctuation, collapse spaces: so WER counts words, not commas or capitals."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = _APOSTROPHES.sub("", text)
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


def _bleu_tokenizer(target_language: str | None) -> str:
    """sacrebleu tokenizer for a target language: 13a splits nothing in scripts without spaces."""
    lang = (target_language or "").lower().split("-")[0].split("_")[0]
    if lang == "zh":
        return "zh"
    if lang in ("ja", "th", "lo", "km", "my"):
        return "char"
    return "13a"


class _UnicodeTokenizer:
    """rouge-score tokenizer for non-English text: normalised words, CJK/Thai one char per token."""

    def tokenize(self, text: str) -> list[str]:
        return _UNICODE_TOKEN.findall(normalize_text(text))


@dataclass
class Scores:
    """Score summary (JSON-friendly dict per task) and the per-row scores behind it."""

    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ROW_COLUMNS))


# ---------------------------------------------------------------------------------------------------
# Selecting the rows to score

def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column as objects with None for missing, or all-None when the dataset lacks it."""
    if name not in df.columns:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    return df[name].astype(object).where(df[name].notna(), None)


def _references(df: pd.DataFrame, task: str) -> pd.Series:
    """The reference of each row: `reference_<task>` where set, else `reference`; '' when none."""
    ref = _col(df, "reference")
    specific = _col(df, f"reference_{task}")
    ref = specific.where(specific.notna() & (specific.astype(str).str.strip() != ""), ref)
    return ref.fillna("").astype(str)


def _with_reference(df: pd.DataFrame, task: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of `task` that have a reference, split into ok rows to score and counted error rows."""
    part = df[df["task"].astype(str) == task] if "task" in df.columns else df.iloc[0:0]
    part = part.assign(_ref=_references(part, task))
    part = part[part["_ref"].str.strip() != ""]
    ok = part[_col(part, "status") == "ok"]
    counts = {"with_reference": int(len(part)), "errors": int(len(part) - len(ok))}
    return ok, counts


def _drop_transcript_references(df: pd.DataFrame, ok: pd.DataFrame, task: str) -> tuple[pd.DataFrame, int]:
    """Skip rows whose reference is the same input's asr reference (a copied transcript reference)."""
    asr = df[df["task"].astype(str) == "asr"]
    if asr.empty or ok.empty:
        return ok, 0
    asr_refs = set(zip(asr["id"].astype(str), _references(asr, "asr")))
    shared = [(i, r) in asr_refs for i, r in zip(ok["id"].astype(str), ok["_ref"])]
    mask = pd.Series(shared, index=ok.index, dtype=bool)
    return ok[~mask], int(mask.sum())


# ---------------------------------------------------------------------------------------------------
# Metrics

def _error_rates(refs: list[str], hyps: list[str]) -> dict[str, float | None]:
    """Corpus WER and CER over normalised texts (None when there is nothing to score)."""
    if not refs:
        return {"wer": None, "cer": None}
    import jiwer

    return {"wer": float(jiwer.process_words(refs, hyps).wer),
            "cer": float(jiwer.process_characters(refs, hyps).cer)}


def _error_rate_group(group: pd.DataFrame) -> dict[str, Any]:
    out = _error_rates(list(group["_nref"]), list(group["_nhyp"]))
    out["n"] = int(len(group))
    return out


def _grouped(rows: pd.DataFrame, column: str, fn: Callable[[pd.DataFrame], dict[str, Any]]) -> dict[str, Any]:
    """`fn` per value of `column` (missing values grouped as 'unknown'), keys sorted."""
    keys = rows[column].fillna(UNKNOWN).astype(str) if column in rows.columns else pd.Series(UNKNOWN, index=rows.index)
    return {str(k): fn(g) for k, g in sorted(rows.groupby(keys), key=lambda kv: str(kv[0]))}


def _prepare_error_rate_rows(ok: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Normalise text and reference; rows whose reference normalises to '' cannot be scored."""
    ok = ok.assign(_nref=[normalize_text(r) for r in ok["_ref"]],
                   _nhyp=[normalize_text(t) for t in _col(ok, "text")])
    empty = ok["_nref"] == ""
    return ok[~empty], int(empty.sum())


def _row_frame(task: str, rows: pd.DataFrame, metrics: dict[str, list[float]]) -> pd.DataFrame:
    """Per-row score table in ROW_COLUMNS order, with the task's ranking metric as `score`."""
    metric, _ = RANK_METRIC[task]
    out = pd.DataFrame({
        "id": rows["id"].astype(str).to_list(),
        "task": task,
        "page": _col(rows, "page").to_list(),
        "language": _col(rows, "language").to_list(),
        "target_language": _col(rows, "target_language").to_list(),
        "text": _col(rows, "text").fillna("").astype(str).to_list(),
        "reference": rows["_ref"].astype(str).to_list(),
    })
    for name in ("wer", "cer", "bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        out[name] = metrics.get(name, [None] * len(out))
    out["metric"] = metric
    out["score"] = out[metric]
    return out[ROW_COLUMNS]


def score_asr(df: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Corpus WER/CER of `asr` rows, overall and per language, plus per-row WER/CER."""
    ok, counts = _with_reference(df, "asr")
    ok, counts["skipped_empty_reference"] = _prepare_error_rate_rows(ok)
    summary = {**counts, "overall": _error_rate_group(ok),
               "by_language": _grouped(ok, "language", _error_rate_group)}
    rows = [_error_rates([r], [h]) for r, h in zip(ok["_nref"], ok["_nhyp"])]
    return summary, _row_frame("asr", ok, {k: [r[k] for r in rows] for k in ("wer", "cer")})


def _join_document_pages(ok_pages: pd.DataFrame, all_rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per (document, reference): page texts joined in page order; incomplete docs dropped."""
    if ok_pages.empty:
        return ok_pages, 0
    bad_ids = set(all_rows.loc[_col(all_rows, "status") != "ok", "id"].astype(str))
    complete = ~ok_pages["id"].astype(str).isin(bad_ids)
    skipped = int((~complete).sum())
    docs = []
    for (_, _), g in ok_pages[complete].groupby([ok_pages["id"].astype(str), "_ref"], sort=False):
        g = g.sort_values("page")
        first = g.iloc[0].copy()
        first["text"] = "\n".join(_col(g, "text").fillna("").astype(str))
        if len(g) > 1:
            first["page"] = None  # scored as a whole document
        docs.append(first)
    return (pd.DataFrame(docs) if docs else ok_pages.iloc[0:0]), skipped


def score_ocr(df: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """CER/WER of `ocr` documents (pages sharing a reference joined), overall and per language."""
    ok, counts = _with_reference(df, "ocr")
    ocr_rows = df[df["task"].astype(str) == "ocr"]
    ok, counts["skipped_incomplete"] = _join_document_pages(ok, ocr_rows)
    ok, counts["skipped_empty_reference"] = _prepare_error_rate_rows(ok)
    summary = {**counts, "overall": _error_rate_group(ok),
               "by_language": _grouped(ok, "language", _error_rate_group)}
    rows = [_error_rates([r], [h]) for r, h in zip(ok["_nref"], ok["_nhyp"])]
    return summary, _row_frame("ocr", ok, {k: [r[k] for r in rows] for k in ("wer", "cer")})


def _bleu_chrf(group: pd.DataFrame) -> dict[str, Any]:
    """Corpus BLEU (tokenizer from the target languages) and chrF of a group of translate rows."""
    if group.empty:
        return {"bleu": None, "chrf": None, "n": 0, "tokenize": None}
    from sacrebleu.metrics import BLEU, CHRF

    toks = {_bleu_tokenizer(t) for t in _col(group, "target_language")}
    tokenize = toks.pop() if len(toks) == 1 else "13a"
    hyps = _col(group, "text").fillna("").astype(str).to_list()
    refs = [group["_ref"].astype(str).to_list()]
    return {"bleu": float(BLEU(tokenize=tokenize).corpus_score(hyps, refs).score),
            "chrf": float(CHRF().corpus_score(hyps, refs).score),
            "n": int(len(group)), "tokenize": tokenize}


def score_translate(df: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Corpus BLEU/chrF of `translate` rows: overall, per source and per target language."""
    from sacrebleu.metrics import BLEU, CHRF

    ok, counts = _with_reference(df, "translate")
    ok, counts["skipped_transcript_reference"] = _drop_transcript_references(df, ok, "translate")
    summary = {**counts, "overall": _bleu_chrf(ok),
               "by_language": _grouped(ok, "language", _bleu_chrf),
               "by_target_language": _grouped(ok, "target_language", _bleu_chrf)}
    bleu, chrf = [], []
    for hyp, ref, tgt in zip(_col(ok, "text").fillna("").astype(str), ok["_ref"], _col(ok, "target_language")):
        bleu.append(float(BLEU(tokenize=_bleu_tokenizer(tgt), effective_order=True).sentence_score(hyp, [ref]).score))
        chrf.append(float(CHRF().sentence_score(hyp, [ref]).score))
    return summary, _row_frame("translate", ok, {"bleu": bleu, "chrf": chrf})


def _rouge_rows(ok: pd.DataFrame) -> dict[str, list[float]]:
    """Per-row ROUGE-1/2/L F1; English-or-unknown rows stemmed, others Unicode-tokenised."""
    from rouge_score import rouge_scorer

    types = ["rouge1", "rouge2", "rougeL"]
    english = rouge_scorer.RougeScorer(types, use_stemmer=True)
    other = rouge_scorer.RougeScorer(types, tokenizer=_UnicodeTokenizer())
    out: dict[str, list[float]] = {t: [] for t in types}
    for hyp, ref, lang in zip(_col(ok, "text").fillna("").astype(str), ok["_ref"], _col(ok, "language")):
        is_en = lang is None or str(lang).lower().startswith("en")
        scores = (english if is_en else other).score(ref, hyp)
        for t in types:
            out[t].append(float(scores[t].fmeasure))
    return out


def _rouge_group(group: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {t: (float(group[t].mean()) if len(group) else None) for t in ("rouge1", "rouge2", "rougeL")}
    out["n"] = int(len(group))
    return out


def score_summarize(df: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """Mean ROUGE-1/2/L F1 of `summarize` rows, overall and per language, plus per-row scores."""
    ok, counts = _with_reference(df, "summarize")
    ok, counts["skipped_transcript_reference"] = _drop_transcript_references(df, ok, "summarize")
    metrics = _rouge_rows(ok)
    scored = ok.assign(**metrics) if len(ok) else ok.assign(rouge1=[], rouge2=[], rougeL=[])
    summary = {**counts, "overall": _rouge_group(scored),
               "by_language": _grouped(scored, "language", _rouge_group)}
    return summary, _row_frame("summarize", ok, metrics)


SCORERS: dict[str, Callable[[pd.DataFrame], tuple[dict[str, Any], pd.DataFrame]]] = {
    "asr": score_asr, "translate": score_translate, "ocr": score_ocr, "summarize": score_summarize,
}


def score_all(df: pd.DataFrame) -> Scores:
    """Scores for every task that has rows with a reference; tasks without any are left out."""
    columns = ({"reference"} | {f"reference_{t}" for t in SCORERS}) & set(df.columns)
    if df.empty or "task" not in df.columns or not any(df[c].notna().any() for c in columns):
        return Scores()  # the manifest's `reference` column passes through even when it is all null
    summary: dict[str, dict[str, Any]] = {}
    frames = []
    for task, scorer in SCORERS.items():
        task_summary, rows = scorer(df)
        if task_summary["with_reference"]:
            summary[task] = task_summary
            frames.append(rows)
    rows = pd.concat(frames, ignore_index=True) if frames else Scores().rows
    return Scores(summary=summary, rows=rows)


def worst_rows(rows: pd.DataFrame, n: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The `n` worst-scored rows of each task, by the task's ranking metric (RANK_METRIC)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task, group in rows.groupby("task", sort=False):
        _, higher_is_worse = RANK_METRIC[str(task)]
        ranked = group.dropna(subset=["score"]).sort_values("score", ascending=not higher_is_worse, kind="stable")
        out[str(task)] = ranked.head(n).astype(object).where(ranked.head(n).notna(), None).to_dict("records")
    return out
