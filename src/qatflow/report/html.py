"""The Markdown subset that reports use, rendered as one self-contained HTML page.

Supported: ATX headings, pipe tables (with ``:`` alignment), ``-``/``*`` lists, fenced code,
paragraphs, ``>`` blockquotes (GitHub's ``> [!TIP]``/``> [!CAUTION]`` alerts become coloured
boxes); inline code, ``**bold**``, ``*italic*``, links and images. Images whose source is
in ``images`` are embedded as base64 PNG data URIs, so the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Mapping

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*$")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")
_LIST_ITEM = re.compile(r"^[-*]\s+(.*)$")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_ALERT = re.compile(r"^\[!(NOTE|TIP|IMPORTANT|WARNING|CAUTION)\]$")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2rem auto; padding: 0 1rem; color: #1d1d1f; line-height: 1.5; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d0d5; padding: 0.3rem 0.6rem; }
th { background: #f2f2f5; }
tr:nth-child(even) td { background: #fafafc; }
code { background: #f2f2f5; padding: 0 0.2rem; border-radius: 3px; }
pre { background: #f2f2f5; padding: 0.8rem; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #e0e0e5; }
blockquote { margin: 1rem 0; padding: 0.5rem 1rem; border-left: 4px solid #d0d0d5; }
blockquote.tip { border-color: #1a7f37; background: #dafbe1; }
blockquote.caution, blockquote.warning { border-color: #cf222e; background: #ffebe9; }
"""


def render_page(markdown: str, *, title: str, images: Mapping[str, bytes]) -> str:
    """A complete HTML document for ``markdown``, with ``images`` embedded by source path."""
    body = markdown_to_html(markdown, images=images)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def markdown_to_html(markdown: str, *, images: Mapping[str, bytes]) -> str:
    """Convert the supported Markdown subset to an HTML fragment."""
    lines = markdown.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("```"):
            end = _find(lines, i + 1, lambda text: text.strip().startswith("```"))
            code = "\n".join(lines[i + 1 : end])
            out.append(f"<pre><code>{html.escape(code)}</code></pre>")
            i = end + 1
        elif match := _HEADING.match(line):
            level = len(match.group(1))
            out.append(f"<h{level}>{_inline(match.group(2), images)}</h{level}>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            end = _find(lines, i + 2, lambda text: not text.strip().startswith("|"))
            out.append(_table(lines[i], lines[i + 1], lines[i + 2 : end], images))
            i = end
        elif line.startswith(">"):
            end = _find(lines, i, lambda text: not text.strip().startswith(">"))
            out.append(_blockquote([t.strip()[1:].strip() for t in lines[i:end]], images))
            i = end
        elif _LIST_ITEM.match(line):
            end = _find(lines, i, lambda text: not _LIST_ITEM.match(text.strip()))
            items = (_inline(t.strip()[1:].strip(), images) for t in lines[i:end])
            out.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
            i = end
        else:
            end = _find(lines, i, lambda text: _starts_block(text, lines))
            end = max(end, i + 1)
            paragraph = " ".join(text.strip() for text in lines[i:end])
            out.append(f"<p>{_inline(paragraph, images)}</p>")
            i = end
    return "\n".join(out) + "\n"


def _starts_block(text: str, lines: list[str]) -> bool:
    stripped = text.strip()
    return (
        not stripped
        or stripped.startswith(("```", "|", ">"))
        or bool(_HEADING.match(stripped) or _LIST_ITEM.match(stripped))
    )


def _blockquote(lines: list[str], images: Mapping[str, bytes]) -> str:
    """A blockquote; a GitHub alert marker on its first line sets its class instead."""
    alert = _ALERT.match(lines[0]) if lines else None
    if alert:
        lines = lines[1:]
    css = f' class="{alert.group(1).lower()}"' if alert else ""
    return f"<blockquote{css}>{markdown_to_html(chr(10).join(lines), images=images)}</blockquote>"


def _find(lines: list[str], start: int, stop: Callable[[str], bool]) -> int:
    """Index of the first line at or after ``start`` for which ``stop(line)`` holds."""
    for index in range(start, len(lines)):
        if stop(lines[index]):
            return index
    return len(lines)


def _table(header: str, rule: str, rows: list[str], images: Mapping[str, bytes]) -> str:
    aligns = [_alignment(cell) for cell in _cells(rule)]

    def row_html(line: str, tag: str) -> str:
        cells = _cells(line)
        parts = []
        for index, cell in enumerate(cells):
            align = aligns[index] if index < len(aligns) else ""
            style = f' style="text-align:{align}"' if align else ""
            parts.append(f"<{tag}{style}>{_inline(cell, images)}</{tag}>")
        return "<tr>" + "".join(parts) + "</tr>"

    body = "".join(row_html(line, "td") for line in rows)
    return f"<table><thead>{row_html(header, 'th')}</thead><tbody>{body}</tbody></table>"


def _cells(line: str) -> list[str]:
    text = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", text)]


def _alignment(rule_cell: str) -> str:
    left, right = rule_cell.startswith(":"), rule_cell.endswith(":")
    if left and right:
        return "center"
    return "right" if right else "left" if left else ""


def _inline(text: str, images: Mapping[str, bytes]) -> str:
    """Escape ``text`` and apply inline Markdown; code spans are left untouched."""
    pieces = _CODE_SPAN.split(text)
    out = []
    for index, piece in enumerate(pieces):
        if index % 2:
            out.append(f"<code>{html.escape(piece)}</code>")
            continue
        piece = html.escape(piece, quote=False)
        piece = _IMAGE.sub(lambda m: _image(m.group(1), m.group(2), images), piece)
        piece = _LINK.sub(lambda m: f'<a href="{_attr(m.group(2))}">{m.group(1)}</a>', piece)
        piece = _BOLD.sub(r"<strong>\1</strong>", piece)
        out.append(_ITALIC.sub(r"<em>\1</em>", piece))
    return "".join(out)


def _image(alt: str, source: str, images: Mapping[str, bytes]) -> str:
    path = html.unescape(source)
    if path in images:
        source = "data:image/png;base64," + base64.b64encode(images[path]).decode("ascii")
    return f'<img alt="{_attr(alt)}" src="{_attr(source)}">'


def _attr(value: str) -> str:
    return html.escape(html.unescape(value), quote=True)
