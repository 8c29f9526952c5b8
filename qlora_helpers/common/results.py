"""Showing a result file: a Markdown table, a "measured on" line and a plot, from the file and a small spec.

A result file is a dict as ``files.optional_benchmark`` returns it (``None`` when no GPU run has written
it yet). A ``Table`` says which file, where its rows are (a key path to a list, or to a dict whose keys
become a column), which rows to keep, and the columns: ``(label, key path or function of the row, format)``.
A key path is dotted, ``"measured.peak_allocated_gib"``; a key that itself holds dots (``"qwen2.5-7b"``)
is matched whole. A format is a format spec for numbers (``".2f"``, ``"+.1f"``, ``".0%"``; text is shown
as it is) or a template (``"~{:g}"``); a value the row lacks shows as "–".

Example:
    >>> spec = Table("sft_modes", "figures.rows",
    ...              columns=(("run", "name", ""), ("peak (GiB)", "measured.peak", ".2f")))
    >>> print(table({"figures": {"rows": [{"name": "a", "measured": {"peak": 1.234}}, {"name": "b"}]}}, spec))
    | run | peak (GiB) |
    |---|---:|
    | a | 1.23 |
    | b | – |
    >>> print(table(None, spec))
    no GPU run yet: benchmarks/results/sft_modes.json is missing (python -m benchmarks.sft_modes on a GPU writes it)

It does not compute: a verdict or a ratio is a column whose function the chapter writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

MISSING = "–"


@dataclass(frozen=True)
class Table:
    """Which result file, where its rows are, which to keep, and the columns to show."""

    file: str                               # benchmarks/results/<file>.json
    rows: str | Callable                    # key path to a list or dict of rows, or a function of the file
    columns: Sequence[tuple] = ()           # (label, key path or function of the row, format)
    key: str = "name"                       # rows from a dict: the column its keys fill
    where: Callable | None = None           # keep only the rows for which where(row) is true
    script: str = ""                        # python -m benchmarks.<script> writes it (default: file)


def missing(spec: Table) -> str:
    """The line shown instead of a table when the file does not exist yet."""
    return (f"no GPU run yet: benchmarks/results/{spec.file}.json is missing "
            f"(python -m benchmarks.{spec.script or spec.file} on a GPU writes it)")


def value(data, path: str, *, default=LookupError):
    """``data`` at a dotted key path; a missing key raises a LookupError naming the path (or gives ``default``).

    Example: ``value({"a": {"qwen2.5": 3}}, "a.qwen2.5") -> 3``.
    """
    node, parts, i = data, path.split("."), 0
    while i < len(parts):
        for j in range(len(parts), i, -1):           # the longest key first: "qwen2.5-7b" holds a dot
            key = ".".join(parts[i:j])
            if isinstance(node, dict) and key in node:
                node, i = node[key], j
                break
        else:
            if default is LookupError:
                raise LookupError(f"'{'.'.join(parts[:i + 1])}' (looking for '{path}')")
            return default
    return node


def select(result: dict, spec: Table) -> list[dict]:
    """The rows of ``spec`` in ``result`` that ``spec.where`` keeps (a dict of rows: see ``as_rows``)."""
    try:
        found = as_rows(spec.rows(result) if callable(spec.rows) else value(result, spec.rows), spec.key)
    except LookupError as err:
        raise ValueError(f"benchmarks/results/{spec.file}.json has no {err} (written by another version of its "
                         f"script): run python -m benchmarks.{spec.script or spec.file} on a GPU again") from None
    return [r for r in found if spec.where is None or spec.where(r)]


def as_rows(found: list | dict, key: str = "name") -> list[dict]:
    """Rows as a list: those of a dict get their key as ``key``, and a scalar value as "value"."""
    if isinstance(found, dict):
        return [{key: k, **(v if isinstance(v, dict) else {"value": v})} for k, v in found.items()]
    return list(found)


def cell(row: dict, path, fmt: str = ""):
    """One cell's text: the value at ``path`` (or ``path(row)``) in ``fmt``; "–" for a value the row lacks."""
    v = path(row) if callable(path) else value(row, path, default=None)
    if v is None:
        return MISSING
    text = fmt.format(v) if "{" in fmt else v if isinstance(v, str) else format(v, fmt)
    return text.replace("|", "\\|")


def markdown(rows: list | dict, columns: Sequence[tuple], *, key: str = "name") -> str:
    """A Markdown table of ``rows`` (a list, or a dict: see ``as_rows``); a column whose first value (that is
    there) is a number is right-aligned."""
    rows = as_rows(rows, key)

    def numeric(path) -> bool:
        found = (path(r) if callable(path) else value(r, path, default=None) for r in rows)
        v = next((v for v in found if v is not None), None)
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "|".join("---:" if numeric(c[1]) else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, *c[1:]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def table(result: dict | None, spec: Table) -> str:
    """The Markdown table of ``spec`` read from ``result``, or the line saying the file is missing."""
    return missing(spec) if result is None else markdown(select(result, spec), spec.columns)


def stamp(result: dict, versions: Sequence[str] = ()) -> str:
    """``measured on <device>, <date>`` from the file's record, with the library versions asked for."""
    named = [f"{name} {result['versions'][name]}" for name in versions]
    return ", ".join([f"measured on {result['device']['name']}", result["date"][:10], *named])


def plot(rows: list[dict], *, x, y, kind: str = "bar", series=None, label=None, log: str = "", ax=None,
         title: str = "", size=(6, 4), color=None) -> Figure:
    """A bar, barh, line or scatter plot of ``y`` against ``x`` (key paths, or functions of a row); one series
    per value of ``series`` (bars side by side, a legend); ``label`` annotates each point of a line or scatter;
    ``log`` is "", "x", "y" or "xy"; ``color``: one colour for all (else one per series). Draws on ``ax`` when
    given (to compose panels); returns the figure."""
    get = lambda r, p: p(r) if callable(p) else value(r, p)
    ax = ax or Figure(figsize=size).subplots()
    groups = {}
    for r in rows:
        groups.setdefault(get(r, series) if series else "", []).append(r)
    bars = kind in ("bar", "barh")
    cats = list(dict.fromkeys(get(r, x) for r in rows))
    for n, (name, sel) in enumerate(groups.items()):
        xs, ys = [get(r, x) for r in sel], [get(r, y) for r in sel]
        if bars:
            width = 0.8 / len(groups)
            at = [cats.index(v) + (n - (len(groups) - 1) / 2) * width for v in xs]
            (ax.bar if kind == "bar" else ax.barh)(at, ys, width, label=str(name), color=color)
            continue
        (ax.plot if kind == "line" else ax.scatter)(xs, ys, label=str(name), color=color)
        for r, px, py in (zip(sel, xs, ys) if label else ()):
            ax.annotate(str(get(r, label)), (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for axis in log:                                # before the ticks: a new scale resets them
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    if bars:
        (ax.set_xticks if kind == "bar" else ax.set_yticks)(range(len(cats)), cats, fontsize=8)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=8)
    return ax.figure
