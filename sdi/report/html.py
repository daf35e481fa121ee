"""Page assembly: one self-contained HTML file (inline CSS, inline script, the data as JSON).

Nothing is fetched: no server, network, external script, font or style sheet. The data is
embedded once as JSON (``<script type="application/json">``, with ``<``, ``>`` and ``&``
escaped so no text can close the element) and :file:`report.js` draws a page of queries at a
time from it, so a report of 1,000 queries opens as fast as one of 10.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

from .. import __version__
from .colors import LEAST_COLOUR, MOST_COLOUR, diverging_stops
from .data import SCHEMA

# Inside <script>, "</script" or "<!--" in a string would end or change the element; as JSON
# escapes these characters mean the same to JSON.parse. U+2028/9 are escaped for old parsers.
_SCRIPT_SAFE = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element (no NaN: ``None`` instead)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).translate(
        _SCRIPT_SAFE
    )


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


# Registered before the report's script runs, so even its syntax errors are recorded in the page
# (the browser test reads #sdi-errors).
_ERROR_TRAP = (
    "window.addEventListener('error',function(e){var b=document.getElementById('sdi-errors');"
    "b.hidden=false;b.textContent+='error: '+e.message+'\\n';});"
)


def _summary(data: dict) -> str:
    """One server-rendered line of what the report holds (readable without the script)."""
    parts = [
        f"{len(data['queries'])} queries",
        f"the {data['k']} most and {data['k']} least influential training examples of each",
        f"{data['steps']} loop steps",
        "TracIn with standard errors" if data["has_se"] else "TracIn (no standard errors)",
        "with position and weight explanations" if data["has_explanations"] else "no explanations",
    ]
    return html.escape(", ".join(parts) + ".")


def render_html(data: dict, *, page_size: int = 10) -> str:
    """The page of report ``data`` (:func:`sdi.report.data.report_data`) as one HTML string."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(
            f"not report data of schema {SCHEMA!r}: build it with sdi.report.report_data"
        )
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    config = {
        "stops": diverging_stops(),
        "missing_colour": "#d0d0d0",
        "most_colour": MOST_COLOUR,
        "least_colour": LEAST_COLOUR,
        "page_size": page_size,
    }
    title = html.escape(data["title"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="sdi {html.escape(__version__)}">
<title>{title}</title>
<style>
{_asset("report.css")}</style>
</head>
<body>
<script>{_ERROR_TRAP}</script>
<header>
<h1>{title}</h1>
<p class="summary">{_summary(data)}</p>
<noscript><p>This report draws its tables and charts with a small script inside this file;
enable JavaScript to read it.</p></noscript>
</header>
<section id="overview">
<h2>Where in the loop the influence sits</h2>
<p class="note">Over all queries: per query loop step, the mean share of the |SDI| of each query's
most (least) influential training examples, and how many queries' most influential examples have
their largest |SDI| at that step.</p>
</section>
<nav id="controls" aria-label="pages of queries"></nav>
<main id="queries"></main>
<pre id="sdi-errors" hidden></pre>
<footer>Made by sdi {html.escape(__version__)}; SDI[i, j, t] is training example i's influence
on query j through loop step t, and its steps add up to TracIn[i, j]. Hover over a point or cell
for its number.</footer>
<script id="sdi-config" type="application/json">{script_json(config)}</script>
<script id="sdi-data" type="application/json">{script_json(data)}</script>
<script>
{_asset("report.js")}</script>
</body>
</html>
"""


def write_report_html(path: str | Path, data: dict, *, page_size: int = 10) -> Path:
    """Write :func:`render_html` of ``data`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(render_html(data, page_size=page_size), encoding="utf-8")
    return path
