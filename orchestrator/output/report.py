"""One session as one self-contained HTML page: transcript, per-turn waterfalls, service latency, start-up health.

Everything comes from the audit (``AuditStore.read_session_log``), the
waterfalls from ``messages.timings`` (``orchestrator.tracing``). The page loads
nothing: styles are inline, the charts are SVG drawn here, there is no script,
and a Content-Security-Policy forbids the browser to fetch anything at all, so
it opens the same from a mail attachment, an air-gapped laptop or a CI artifact.
Every text from the model or a caller is escaped, its control characters dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from heist_common.audit.tokens import TokenTotals
from orchestrator.output.atomic import write_atomically
from orchestrator.output.text import strip_controls
from orchestrator.tracing import Step, read_timings

__all__ = ["render_report", "report_path", "write_report"]

KINDS = ("llm", "token", "tool", "memory", "audit")
KIND_LABELS = {"llm": "LLM", "token": "OAuth token", "tool": "tool RPC", "memory": "memory", "audit": "audit write"}
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
"""The page may fetch nothing: no script, font, style sheet or image from anywhere."""

STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dde5; --bg: #f6f7f9; --card: #fff;
  --llm: #7b4fd6; --token: #d68a00; --tool: #1f77d0; --memory: #19996b; --audit: #6d7686; --error: #d13b3b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--ink); background: var(--bg); }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 17px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 0 0 6px; }
.muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
  min-width: 130px; }
.card b { display: block; font-size: 20px; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef0f4; font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: var(--memory); font-weight: 600; }
.bad { color: var(--error); font-weight: 600; }
.turn { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
  margin: 10px 0; }
.turn.failed { border-left: 4px solid var(--error); }
.said { white-space: pre-wrap; word-break: break-word; margin: 6px 0; }
.calls { margin: 6px 0 0; padding-left: 18px; font-size: 13px; }
.calls li { margin: 2px 0; word-break: break-word; }
code { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eef0f4;
  padding: 1px 4px; border-radius: 3px; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; margin: 0 0 8px; font-size: 13px; }
.legend span::before { content: ""; display: inline-block; width: 12px; height: 12px; margin-right: 5px;
  vertical-align: -2px; border-radius: 2px; background: var(--c); }
.waterfall { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px;
  margin: 10px 0; }
svg text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--ink); }
svg .axis { stroke: var(--line); }
svg .k-llm { fill: var(--llm); } svg .k-token { fill: var(--token); } svg .k-tool { fill: var(--tool); }
svg .k-memory { fill: var(--memory); } svg .k-audit { fill: var(--audit); }
svg .failed { stroke: var(--error); stroke-width: 2; }
svg .tick { fill: var(--muted); font-size: 11px; }
"""

LABEL_WIDTH = 270
BAR_WIDTH = 590
VALUE_WIDTH = 170
ROW_HEIGHT = 20
AXIS_HEIGHT = 22


def _text(value: object) -> str:
    """Every text on the page: escaped, and without the control characters a browser or a copy would carry."""
    return escape(strip_controls("" if value is None else str(value)))


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f} ms" if value < 10_000 else f"{value / 1000:,.2f} s"


def _timeline(message: dict[str, Any]) -> tuple[list[Step], float] | None:
    """Return the turn's stored steps (of the kinds drawn) and total, or None (an audit from before timings)."""
    parsed = read_timings(message.get("timings"))
    if parsed is None:
        return None
    steps, total = parsed
    return [step for step in steps if step.kind in KINDS], total


def _nice_step(total: float) -> float:
    """Return a round tick interval that splits ``total`` into about four parts."""
    raw = max(total / 4, 0.001)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10.0 * magnitude


def waterfall_svg(turn_id: int, steps: list[Step], total_ms: float) -> str:
    """Draw one turn's steps as bars on a shared time axis (each step one row, in start order)."""
    total = max(total_ms, max((s.start_ms + s.ms for s in steps), default=0.0), 0.001)
    width = LABEL_WIDTH + BAR_WIDTH + VALUE_WIDTH
    height = AXIS_HEIGHT + ROW_HEIGHT * max(len(steps), 1) + 6
    scale = BAR_WIDTH / total
    parts = [
        f'<svg class="waterfall-chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="Turn {turn_id} waterfall">'
    ]
    tick = _nice_step(total)
    value = 0.0
    while value <= total + 1e-9:
        x = LABEL_WIDTH + value * scale
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{AXIS_HEIGHT - 4}" x2="{x:.1f}" y2="{height}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{AXIS_HEIGHT - 8}" text-anchor="middle">{_ms(value)}</text>')
        value += tick
    if not steps:
        parts.append(f'<text x="{LABEL_WIDTH}" y="{AXIS_HEIGHT + 14}" class="muted">no steps recorded</text>')
    for row, step in enumerate(steps):
        y = AXIS_HEIGHT + row * ROW_HEIGHT
        x = LABEL_WIDTH + step.start_ms * scale
        bar = max(step.ms * scale, 2.0)
        failed = step.code != "OK"
        name = step.name
        title = f"{KIND_LABELS[step.kind]}: {name} — {_ms(step.ms)}, from +{_ms(step.start_ms)}" + (
            f" — {step.code}" if failed else ""
        )
        parts.append(
            f'<text x="{LABEL_WIDTH - 8}" y="{y + 14}" text-anchor="end">{_text(_cut(name, 36))}</text>'
            f'<rect class="k-{step.kind}{" failed" if failed else ""}" x="{x:.1f}" y="{y + 3}" '
            f'width="{bar:.1f}" height="{ROW_HEIGHT - 6}" rx="2"><title>{_text(title)}</title></rect>'
            f'<text x="{min(x + bar + 6, LABEL_WIDTH + BAR_WIDTH + 4):.1f}" y="{y + 14}" class="tick">'
            f"{_text(_ms(step.ms))}{_text(' ' + step.code) if failed else ''}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def service_summary(log: dict[str, Any]) -> list[dict[str, Any]]:
    """Per service (and the LLM, and the audit): calls, errors, p50, p95 and max latency.

    From the turns' timelines; for turns without one (older audits), from the
    tool_usage rows, so an old session still gets its tool latencies.
    """
    samples: dict[str, list[tuple[float, bool]]] = {}
    untimed_turns = set()
    for message in log["messages"]:
        timeline = _timeline(message)
        if timeline is None:
            untimed_turns.add(message["turn_id"])
            continue
        for step in timeline[0]:
            if step.kind in ("llm", "audit"):
                service = step.kind
            elif "(" in step.name:  # "token (cached)", "prefetched memory (wait)": not a call to a service
                continue
            else:
                service = step.name.split(".", 1)[0]
            samples.setdefault(service, []).append((step.ms, step.code == "OK"))
    for row in log["tool_usage"]:
        if row["turn_id"] in untimed_turns and row.get("latency_ms") is not None:
            samples.setdefault(row["tool_name"], []).append((float(row["latency_ms"]), bool(row["success"])))
    summary = []
    for service, values in sorted(samples.items()):
        latencies = [value for value, _ in values]
        summary.append(
            {
                "service": service,
                "calls": len(values),
                "errors": sum(1 for _, ok in values if not ok),
                "p50_ms": _percentile(latencies, 0.5),
                "p95_ms": _percentile(latencies, 0.95),
                "max_ms": max(latencies),
            }
        )
    return summary


def _health_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["operation"] == "health_check" and event.get("turn_id") is None]


def _status_class(status: str) -> str:
    return "ok" if status in ("SERVING", "OK", "completed", "ok") else "bad"


def render_report(log: dict[str, Any]) -> str:
    """Render the whole page for one session log (``AuditStore.read_session_log``)."""
    session = log["session"]
    messages = log["messages"]
    tools_by_turn: dict[int, list[dict[str, Any]]] = {}
    for row in log["tool_usage"]:
        tools_by_turn.setdefault(row["turn_id"], []).append(row)
    errors_by_turn: dict[int, list[dict[str, Any]]] = {}
    for event in log["events"]:
        if event.get("turn_id") is not None and event["status_code"] != "OK":
            errors_by_turn.setdefault(event["turn_id"], []).append(event)
    calls_ok = sum(1 for row in log["tool_usage"] if row["success"])
    calls_failed = len(log["tool_usage"]) - calls_ok
    errors = sum(len(rows) for rows in errors_by_turn.values())
    turn_total = sum(float(m["latency_ms"] or 0) for m in messages)
    tokens = TokenTotals.from_messages(messages)
    token_card = (
        f'<div class="card">LLM tokens<b>{"~" if tokens.session.estimated else ""}{tokens.session.total}</b></div>'
        if tokens.session.counted_turns
        else ""
    )

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Heist session {_text(session['session_id'])}</title>",
        f"<style>{STYLE}</style></head><body><main>",
        f"<h1>Heist session {_text(session['session_id'])}</h1>",
        f'<div class="muted">{_text(session["start_time"])} → {_text(session.get("end_time") or "-")} · '
        f"model {_text(session.get('model') or '-')} · strategy {_text(session.get('strategy') or '-')}"
        f"{' · seed ' + _text(session['seed']) if session.get('seed') is not None else ''}</div>",
        '<div class="cards">',
        f'<div class="card">status<b class="{_status_class(session["status"])}">{_text(session["status"])}</b></div>',
        f'<div class="card">turns<b>{len(messages)}</b></div>',
        f'<div class="card">tool calls<b>{calls_ok} ok · {calls_failed} failed</b></div>',
        f'<div class="card">errors<b class="{"bad" if errors else "ok"}">{errors}</b></div>',
        f'<div class="card">time in turns<b>{_text(_ms(turn_total))}</b></div>',
        token_card,
        "</div>",
    ]
    if session.get("error"):
        out.append(f'<p class="bad">Error: {_text(session["error"])}</p>')

    out += ["<h2>Health at start</h2>", _health_table(_health_rows(log["events"]))]
    out += ["<h2>Where the time went, per turn</h2>", _legend()]
    for message in messages:
        timeline = _timeline(message)
        header = (
            f'<h3 id="waterfall-{_text(message["turn_id"])}">Turn {_text(message["turn_id"])} · '
            f"{_text(message['agent_name'])} · {_text(_ms(message['latency_ms']))}</h3>"
        )
        if timeline is None:
            out.append(f'<div class="waterfall">{header}<p class="muted">No timings recorded for this turn '
                       "(written by a version before timings were audited).</p></div>")  # fmt: skip
        else:
            chart = waterfall_svg(int(message["turn_id"]), *timeline)
            out.append(f'<div class="waterfall">{header}{chart}</div>')

    out += ["<h2>Latency and errors per service</h2>", _summary_table(service_summary(log))]
    if tokens.session.counted_turns:
        out += ["<h2>LLM tokens per agent</h2>", _tokens_table(tokens)]
    out += ["<h2>Transcript</h2>"]
    for message in messages:
        turn = message["turn_id"]
        out.append(_turn_html(message, tools_by_turn.get(turn, []), errors_by_turn.get(turn, [])))
    session_errors = [e for e in log["events"] if e.get("turn_id") is None and e["operation"] != "health_check"]
    if session_errors:
        out += ["<h2>Session events</h2>", _events_table(session_errors)]
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _legend() -> str:
    items = "".join(f'<span style="--c: var(--{kind})">{KIND_LABELS[kind]}</span>' for kind in KINDS)
    return f'<div class="legend">{items}<span style="--c: var(--error)">red outline: failed</span></div>'


def _health_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">No health results recorded.</p>'
    body = "".join(
        f'<tr><td>{_text(r["service"])}</td><td class="{_status_class(r["status_code"])}">{_text(r["status_code"])}'
        f'</td><td class="num">{_text(_ms(r["latency_ms"]))}</td><td>{_text(r["detail"])}</td></tr>'
        for r in rows
    )
    return (
        '<table class="health"><thead><tr><th>service</th><th>status</th><th class="num">latency</th>'
        f"<th>target / detail</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _summary_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">No calls recorded.</p>'
    body = "".join(
        f'<tr><td>{_text(r["service"])}</td><td class="num">{r["calls"]}</td>'
        f'<td class="num {"bad" if r["errors"] else ""}">{r["errors"]}</td>'
        f'<td class="num">{_text(_ms(r["p50_ms"]))}</td><td class="num">{_text(_ms(r["p95_ms"]))}</td>'
        f'<td class="num">{_text(_ms(r["max_ms"]))}</td></tr>'
        for r in rows
    )
    return (
        '<table class="services"><thead><tr><th>service</th><th class="num">calls</th><th class="num">errors</th>'
        '<th class="num">p50</th><th class="num">p95</th><th class="num">max</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _tokens_table(tokens: TokenTotals) -> str:
    rows = [*tokens.agents.items(), ("all agents", tokens.session)]
    body = "".join(
        f'<tr><td>{_text(name)}</td><td class="num">{count.counted_turns}</td>'
        f'<td class="num">{count.prompt}</td><td class="num">{count.completion}</td>'
        f'<td class="num">{count.total}</td><td>{"estimated in part" if count.estimated else "reported"}</td></tr>'
        for name, count in rows
    )
    return (
        '<table class="tokens"><thead><tr><th>agent</th><th class="num">turns</th><th class="num">prompt</th>'
        '<th class="num">completion</th><th class="num">total</th><th>source</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _turn_html(message: dict[str, Any], tools: list[dict[str, Any]], errors: list[dict[str, Any]]) -> str:
    failed = message["status"] != "ok"
    items = []
    for row in tools:
        outcome = (
            '<span class="ok">ok</span>' if row["success"] else f'<span class="bad">{_text(row["status_code"])}</span>'
        )
        items.append(
            f"<li>tool <code>{_text(row['tool_name'])}.{_text(row['operation'])}</code> "
            f"<code>{_text(_cut(str(row['tool_params']), 200))}</code> → {outcome} "
            f"({_text(_ms(row['latency_ms']))}): {_text(_cut(str(row['tool_result']), 300))}</li>"
        )
    for event in errors:
        items.append(
            f'<li class="bad">{_text(event["service"])}.{_text(event["operation"])} {_text(event["status_code"])}: '
            f"{_text(_cut(str(event['detail']), 300))}</li>"
        )
    calls = f'<ul class="calls">{"".join(items)}</ul>' if items else ""
    trace = f" · trace <code>{_text(message['trace_id'])}</code>" if message.get("trace_id") else ""
    if message.get("prompt_tokens") is not None:
        mark = "~" if message.get("tokens_estimated") else ""
        trace = (
            f" · {mark}{_text(message['prompt_tokens'])} + {mark}{_text(message['completion_tokens'])} tokens{trace}"
        )
    return (
        f'<div class="turn{" failed" if failed else ""}" id="turn-{_text(message["turn_id"])}">'
        f"<h3>Turn {_text(message['turn_id'])}: {_text(message['agent_name'])} "
        f'<span class="muted">({_text(message["agent_role"])})</span></h3>'
        f'<div class="muted">{_text(message["timestamp"])} · {_text(_ms(message["latency_ms"]))} · '
        f'<span class="{_status_class(message["status"])}">{_text(message["status"])}</span>{trace} · '
        f'<a href="#waterfall-{_text(message["turn_id"])}">waterfall</a></div>'
        f'<div class="said">{_text(message["message"])}</div>{calls}</div>'
    )


def _events_table(rows: list[dict[str, Any]]) -> str:
    body = "".join(
        f"<tr><td>{_text(r['timestamp'])}</td><td>{_text(r['service'])}.{_text(r['operation'])}</td>"
        f'<td class="{_status_class(r["status_code"])}">{_text(r["status_code"])}</td>'
        f"<td>{_text(r['detail'])}</td></tr>"
        for r in rows
    )
    head = "<tr><th>time</th><th>what</th><th>status</th><th>detail</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def report_path(out_dir: Path, session_id: str) -> Path:
    """Where a session's report goes by default."""
    return out_dir / f"{session_id}.html"


def write_report(log: dict[str, Any], path: Path) -> Path:
    """Write the page, whole or not at all (``write_atomically``); return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, render_report(log))
    return path
