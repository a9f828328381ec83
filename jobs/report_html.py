"""The report's rendering: one self-contained HTML page (inline CSS, plots as data: URIs) and the text summary.

The page can be mailed or attached to a ticket as is: nothing in it is fetched from anywhere.
"""
from __future__ import annotations

import html
import os
from typing import Any

from jobs import scoring
from jobs.report_data import PERCENTILES, WORST_N
from jobs.report_plots import plot_error_rates, plot_latency, plot_status, plot_throughput

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212121;background:#fafafa;margin:0}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#616161;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 14px;min-width:112px}
.card b{display:block;font-size:20px}.card span{color:#616161;font-size:12px}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;align-items:start}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0 8px}
th,td{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f1f1f1}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.t{max-width:360px;word-break:break-word}
.err{color:#c62828}.ok{color:#2e7d32}.warn{background:#fff3e0;border:1px solid #ffb74d;padding:8px 12px;border-radius:4px;margin:12px 0}
img{max-width:100%;background:#fff;border:1px solid #e0e0e0;border-radius:4px}.muted{color:#757575}
code{font-size:12px}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer() or digits:
        return f"{value:,.{digits}f}"
    return f"{int(value):,}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _cut(text: Any, limit: int = 160) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(headers: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """A table; each cell is (html, css class) so numbers align right and long text wraps."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for v, c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(b64: str | None, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{_esc(alt)}">' if b64 else ""


def _cards(report: dict[str, Any]) -> str:
    totals, tp = report["status_totals"], report["throughput"]
    err_rate = totals["error"] / totals["total"] if totals.get("total") else None
    cards = [("rows", _num(report["rows"])), ("ok", _num(totals["ok"])),
             ("errors", f'{_num(totals["error"])} ({_pct(err_rate)})'), ("runs", _num(tp["runs"])),
             ("GPU hours", _num(tp["gpu_hours"], 2)), ("audio h / GPU h", _num(tp["audio_hours_per_gpu_hour"], 1)),
             ("pages / GPU h", _num(tp["pages_per_gpu_hour"], 0))]
    return '<section class="cards">' + "".join(
        f"<div class=card><b>{v}</b><span>{_esc(k)}</span></div>" for k, v in cards) + "</section>"


def _counts_html(report: dict[str, Any]) -> str:
    rows = [[(_esc(t), ""), (_num(c.get("ok", 0)), "n ok"), (_num(c.get("error", 0)), "n err"),
             (_num(c["total"]), "n"), (_pct(c.get("error", 0) / c["total"] if c["total"] else None), "n")]
            for t, c in report["counts"].items()]
    table = _table(["task", "ok", "error", "total", "error rate"], rows) if rows else "<p class=muted>No rows.</p>"
    return f"<h2>Rows per task</h2><div class=grid><div>{table}</div><div>{_img(plot_status(report['counts']), 'rows per task and status')}</div></div>"


def _errors_html(report: dict[str, Any]) -> str:
    if not report["errors"]:
        return "<h2>Errors</h2><p class=muted>No error rows.</p>"
    rows = [[(_esc(g["reason"]), "t"), (_num(g["count"]), "n"),
             (_esc(", ".join(f"{t} {n}" for t, n in g["tasks"].items())), ""),
             (f"<code>{_esc(g['example_id'])}</code>", ""), (_esc(_cut(g["example_error"], 200)), "t muted")]
            for g in report["errors"]]
    return "<h2>Errors</h2>" + _table(["reason (input names removed)", "rows", "tasks", "example input", "example message"], rows)


def _throughput_html(report: dict[str, Any]) -> str:
    runs = report["runs"]
    if not runs:
        return "<h2>Throughput</h2><p class=muted>No run records under <code>_runs/</code>.</p>"
    rows = [[(f"<code>{_esc(r['run_id'])}</code>", ""), (_esc(r["job"] or "—"), ""), (_esc(r["finished_at"] or "—"), ""),
             (_num(r["wall_s"], 1), "n"), (_num(r["gpus"]), "n"), (_num(r["gpu_hours"], 3), "n"),
             (_num(r["audio_hours"], 2), "n"), (_num(r["pages"]), "n"),
             (_num(r["audio_hours_per_gpu_hour"], 1), "n"), (_num(r["pages_per_gpu_hour"], 0), "n")]
            for r in runs]
    tp = report["throughput"]
    rows.append([("<b>total</b>", ""), ("", ""), ("", ""), (_num(tp["wall_s"], 1), "n"), ("", ""),
                 (_num(tp["gpu_hours"], 3), "n"), (_num(tp["audio_hours"], 2), "n"), (_num(tp["pages"]), "n"),
                 (_num(tp["audio_hours_per_gpu_hour"], 1), "n"), (_num(tp["pages_per_gpu_hour"], 0), "n")])
    table = _table(["run", "job", "finished", "wall s", "GPUs", "GPU h", "audio h", "pages",
                    "audio h / GPU h", "pages / GPU h"], rows)
    note = ("<p class=muted>GPU hours = wall time × GPUs. Each total rate divides by the GPU hours of the runs "
            "that processed that modality.</p>")
    return f"<h2>Throughput</h2>{table}{note}{_img(plot_throughput(runs), 'throughput per run')}"


def _cost_html(report: dict[str, Any]) -> str:
    tok = report["tokens"]
    tok_rows = [[(_esc(t), ""), (_num(v.get("input")), "n"), (_num(v.get("output")), "n")] for t, v in tok.items()]
    lat_rows = [[(_esc(t), ""), (_num(s["n"]), "n"), (_num(s["mean"], 2), "n")]
                + [(_num(s[f"p{p}"], 2), "n") for p in PERCENTILES] + [(_num(s["max"], 2), "n")]
                for t, s in report["latency"].items()]
    tables = (("<h3>Tokens</h3>" + _table(["task", "input", "output"], tok_rows) if tok_rows else "")
              + ("<h3>Latency per row (s)</h3>" + _table(["task", "rows", "mean", *[f"p{p}" for p in PERCENTILES], "max"],
                                                         lat_rows) if lat_rows else ""))
    if not tables:
        return ""
    return f"<h2>Tokens and latency</h2><div class=grid><div>{tables}</div><div>{_img(plot_latency(report['latency_histogram']), 'latency histogram')}</div></div>"


_SCORE_METRICS = {"asr": [("wer", "WER", _pct), ("cer", "CER", _pct)],
                  "ocr": [("cer", "CER", _pct), ("wer", "WER", _pct)],
                  "translate": [("bleu", "BLEU", lambda v: _num(v, 1)), ("chrf", "chrF", lambda v: _num(v, 1))],
                  "summarize": [("rouge1", "ROUGE-1", lambda v: _num(v, 3)), ("rouge2", "ROUGE-2", lambda v: _num(v, 3)),
                                ("rougeL", "ROUGE-L", lambda v: _num(v, 3))]}


def _scores_html(report: dict[str, Any]) -> str:
    scores = report["scores"]
    if not scores:
        return "<h2>Scores</h2><p class=muted>No rows carry a reference, so nothing was scored.</p>"
    parts = ["<h2>Scores</h2>"]
    for task, s in scores.items():
        metrics = _SCORE_METRICS.get(task, [])
        groups = [("overall", s["overall"])] + [(f"language {k}", v) for k, v in s.get("by_language", {}).items()]
        groups += [(f"target {k}", v) for k, v in s.get("by_target_language", {}).items()]
        rows = [[(_esc(name), ""), (_num(g.get("n")), "n")] + [(fmt(g.get(key)), "n") for key, _, fmt in metrics]
                for name, g in groups]
        skipped = {k: v for k, v in s.items() if k.startswith("skipped_") and v}
        note = (f"{_num(s['with_reference'])} rows with a reference; {_num(s['errors'])} of them errors (not scored)"
                + "".join(f"; {_num(v)} {k.replace('_', ' ')}" for k, v in skipped.items()))
        parts.append(f"<h3>{_esc(task)}</h3>" + _table(["group", "n", *[m[1] for m in metrics]], rows)
                     + f"<p class=muted>{_esc(note)}</p>")
    parts.append(_img(plot_error_rates(scores), "ASR error rate per language"))
    parts.append("<p class=muted>WER/CER on lowercased text without punctuation; BLEU/chrF: sacrebleu corpus "
                 "scores; ROUGE: mean F1.</p>")
    return "".join(parts)


def _worst_html(report: dict[str, Any]) -> str:
    if not report["worst"]:
        return ""
    parts = [f"<h2>Worst rows (up to {WORST_N} per task)</h2>"]
    for task, rows in report["worst"].items():
        metric = scoring.RANK_METRIC[task][0]
        fmt = next((f for key, _, f in _SCORE_METRICS[task] if key == metric), lambda v: _num(v, 3))
        cells = [[(f"<code>{_esc(r['id'])}</code>", ""), (_esc("all" if r.get("page") is None else r["page"]), "n"),
                  (_esc(r.get("target_language") or r.get("language") or ""), ""), (fmt(r["score"]), "n"),
                  (_esc(_cut(r["text"])), "t"), (_esc(_cut(r["reference"])), "t muted")] for r in rows]
        parts.append(f"<h3>{_esc(task)} by {_esc(metric)}</h3>"
                     + _table(["id", "page", "lang", metric, "text", "reference"], cells))
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS, plots as data: URIs)."""
    notes = list(report.get("warnings") or [])
    if report.get("duplicate_keys"):
        notes.insert(0, f"{report['duplicate_keys']} rows repeat an (id, task, target_language, page) key")
    warn = "".join(f'<div class="warn">{_esc(n)}</div>' for n in notes)
    body = "".join([_cards(report), warn, _counts_html(report), _errors_html(report), _throughput_html(report),
                    _cost_html(report), _scores_html(report), _worst_html(report)])
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>phi4mm report: {_esc(report['output'])}</title><style>{CSS}</style></head><body><main>"
            f"<h1>phi4mm-batch report</h1><p class=meta><code>{_esc(report['output'])}</code> · generated "
            f"{_esc(report['generated_at'])}</p>{body}</main></body></html>")


def write_html(report: dict[str, Any], path: str) -> None:
    """Write `render_html(report)` to a local file (parent folders created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))


# ---------------------------------------------------------------------------------------------------
# Terminal

def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, top errors, throughput, headline scores."""
    lines = [f"{report['output']}: {report['rows']:,} rows, {report['throughput']['runs']} runs"]
    lines += [f"  {task:<10} ok {c.get('ok', 0):>8,}  error {c.get('error', 0):>6,}  total {c['total']:>8,}"
              for task, c in report["counts"].items()]
    if report.get("duplicate_keys"):
        lines.append(f"  WARNING: {report['duplicate_keys']} duplicate keys")
    for g in report["errors"][:5]:
        lines.append(f"  error x{g['count']}: {_cut(g['reason'], 100)} (e.g. {g['example_id']})")
    tp = report["throughput"]
    if tp["runs"]:
        lines.append(f"  throughput: {_num(tp['audio_hours_per_gpu_hour'], 1)} audio h/GPU h, "
                     f"{_num(tp['pages_per_gpu_hour'], 0)} pages/GPU h over {_num(tp['gpu_hours'], 2)} GPU h")
    s = report["scores"]
    heads = []
    if "asr" in s:
        heads.append(f"asr WER {_pct(s['asr']['overall']['wer'])} CER {_pct(s['asr']['overall']['cer'])}")
    if "translate" in s:
        heads.append(f"translate BLEU {_num(s['translate']['overall']['bleu'], 1)} chrF {_num(s['translate']['overall']['chrf'], 1)}")
    if "ocr" in s:
        heads.append(f"ocr CER {_pct(s['ocr']['overall']['cer'])}")
    if "summarize" in s:
        heads.append(f"summarize ROUGE-L {_num(s['summarize']['overall']['rougeL'], 3)}")
    if heads:
        lines.append("  scores: " + "; ".join(heads))
    lines += [f"  warning: {w}" for w in report.get("warnings") or []]
    return "\n".join(lines)
