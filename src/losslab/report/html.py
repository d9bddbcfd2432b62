"""``report.html``: one self-contained file (figures embedded as base64 data URIs) to send or archive."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.7rem; text-align: right; border-bottom: 1px solid #ddd; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; }
figure { margin: 1.5rem 0; }
img { max-width: 100%; }
"""


def _image(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{escape(png.stem)}" src="data:image/png;base64,{data}">'


def render(title: str, table: pd.DataFrame, notes: list[str], runs: pd.DataFrame,
           figures: list[tuple[str, Path]]) -> str:
    """The comparison table, notes, figures (caption, PNG) and the list of runs, as one HTML page."""
    notes_html = "".join(f"<li>{escape(note)}</li>" for note in notes) or "<li>none</li>"
    figures_html = "".join(
        f"<figure>{_image(png)}<figcaption>{escape(caption)}</figcaption></figure>" for caption, png in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
{table.to_html(index=False, border=0)}
<h2>Notes</h2>
<ul>{notes_html}</ul>
<h2>Figures</h2>
{figures_html}
<h2>Runs</h2>
{runs.to_html(index=False, border=0)}
</body>
</html>
"""
