"""A small self-contained HTML page (inline CSS, images as data URIs): what the run report writes. Snakemake's
report shows an HTML result in an iframe from a data URI, so the page links to nothing beside it."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 15px; margin: 16px 24px;
       color: #1a1a1a; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 18px; margin: 22px 0 6px 0; }
p.note { color: #555; margin: 4px 0 8px 0; }
table { border-collapse: collapse; margin: 4px 0 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.hash, td.path { font-family: ui-monospace, monospace; font-size: 13px; word-break: break-all; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{esc('—' if value is None else value)}</td>"
    if isinstance(value, int | float):
        return f'<td class="num">{esc(fmt(value))}</td>'
    text = str(value)
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return f'<td class="hash">{esc(text)}</td>'
    kind = ' class="path"' if "/" in text and " " not in text else ""
    return f"<td{kind}>{esc(text)}</td>"


def fmt(value: float) -> str:
    """Integers as they are; floats with 4 significant digits (0.001234, 12.35, 1.5e-05)."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(rows: Iterable[tuple[str, object]]) -> str:
    """A two-column table, the names as row headers."""
    body = "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def section(title: str, *parts: str) -> str:
    return f"<h2>{esc(title)}</h2>" + "".join(parts)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>{note(subtitle)}{''.join(sections)}</body></html>\n"
    )
