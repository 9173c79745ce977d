"""A self-contained HTML page: escaped text, tables and PNG figures embedded as data URIs.

Nothing is fetched at view time: the page carries a Content-Security-Policy that allows only inline
styles and ``data:`` images, and it has no scripts. Every string that came from a file is escaped, so
a value such as ``<script>`` in a CSV shows as text.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;
color:#1b1f23;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-top:1.4rem}.meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #d0d7de;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}figcaption{font-size:.85rem;color:#57606a}
img{max-width:100%;height:auto;border:1px solid #eaeef2}pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;
font-size:.82rem;white-space:pre-wrap}.note{color:#57606a;font-size:.88rem}nav a{margin-right:.8rem}
"""

#: what the page may load: its own inline style and data: images, nothing from a network or a file
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """A cell's text: integers with separators, floats to 4 significant digits, the rest as given."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


@dataclass
class Section:
    """One ``<h2>`` section: blocks of HTML built by the methods below (already escaped)."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def text(self, text: str, css: str = "") -> None:
        self.blocks.append(f'<p{f" class={css!r}" if css else ""}>{escape(text)}</p>')

    def heading(self, text: str) -> None:
        self.blocks.append(f"<h3>{escape(text)}</h3>")

    def pre(self, text: str) -> None:
        self.blocks.append(f"<pre>{escape(text)}</pre>")

    def table(self, columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        body = []
        for row in rows:
            cells = []
            for v in row:
                num = isinstance(v, (int, float)) and not isinstance(v, bool)
                cells.append(f'<td{" class=num" if num else ""}>{escape(format_value(v))}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def png(self, data: bytes, caption: str) -> None:
        """Embed PNG bytes (checked by their signature: anything else is not embedded)."""
        if not data.startswith(PNG_MAGIC):
            self.text(f"{caption}: not a PNG file, left out", "note")
            return
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        self.blocks.append(f'<figure><img src="{uri}" alt="{escape(caption)}"><figcaption>{escape(caption)}'
                           "</figcaption></figure>")

    def __bool__(self) -> bool:
        return bool(self.blocks)


def page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole document: a header, a table of contents and the non-empty sections."""
    shown = [s for s in sections if s]
    nav = "".join(f'<a href="#s{i}">{escape(s.title)}</a>' for i, s in enumerate(shown))
    body = "".join(f'<section id="s{i}"><h2>{escape(s.title)}</h2>{"".join(s.blocks)}</section>'
                   for i, s in enumerate(shown))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
            f'<h1>{escape(title)}</h1><p class="meta">{escape(subtitle)}</p><nav>{nav}</nav>{body}</body></html>\n')
