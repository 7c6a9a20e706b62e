"""Plain-text tables and durations for ``celery sheppy``: 80 columns, no dependencies.

A table is a list of :class:`Column` and rows of cells (str, int, float or None). Numbers
align right; when the natural width is over the terminal's, the columns marked
``flex`` are cut (with ``…``) down to their ``least`` width, widest first.
"""

from dataclasses import dataclass

WIDTH = 80
GAP = "  "


@dataclass
class Column:
    title: str
    right: bool = False  #: align right (numbers)
    flex: bool = False  #: may be cut to fit the width
    least: int = 8  #: narrowest a flex column is cut to


def cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cut(text, width):
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def render(columns, rows, width=WIDTH):
    """The table as lines of at most ``width`` characters (unless nothing can be cut)."""
    texts = [[cell(value) for value in row] for row in rows]
    widths = [max([len(col.title)] + [len(row[i]) for row in texts])
              for i, col in enumerate(columns)]
    excess = sum(widths) + len(GAP) * (len(columns) - 1) - width
    while excess > 0:
        cuttable = [i for i, col in enumerate(columns)
                    if col.flex and widths[i] > max(col.least, len(col.title))]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda i: widths[i])
        floor = max(columns[widest].least, len(columns[widest].title))
        step = min(excess, widths[widest] - floor)
        widths[widest] -= step
        excess -= step
    lines = []
    for row in [[col.title for col in columns]] + texts:
        parts = []
        for col, text, size in zip(columns, row, widths):
            text = cut(text, size)
            parts.append(text.rjust(size) if col.right else text.ljust(size))
        lines.append(GAP.join(parts).rstrip())
    return lines


def duration(seconds):
    """``0.4s``, ``12s``, ``3m05s``, ``2h13m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 10:
        return f"{sign}{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{sign}{whole}s"
    if whole < 3600:
        return f"{sign}{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{sign}{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{sign}{whole // 86400}d{whole % 86400 // 3600:02d}h"
