"""PNG figures for the benchmark report, from LoadResult dicts and batch-size counts.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through
pyplot, so importing this module changes no global backend and works without a
display. Missing data (no runs, a None latency) is skipped, not drawn as zero; an
empty figure says "no data" instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ["plot_batch_sizes", "plot_latency_vs_throughput", "plot_step_load"]

_DPI = 120


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _log_y(ax: Axes) -> None:
    """A log y axis labelled in plain numbers (2, 5, 10, 20 ms), not powers of ten."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))


def _no_data(ax: Axes, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _number(value: Any) -> float | None:
    """A plottable float, or None for a missing or NaN value."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _points(rows: Iterable[Mapping[str, Any]], x_key: str, y_of) -> tuple[list[float], list[float], list[Any]]:
    xs, ys, rows_kept = [], [], []
    for row in rows:
        x, y = _number(row.get(x_key)), _number(y_of(row))
        if x is not None and y is not None and y > 0:
            xs.append(x)
            ys.append(y)
            rows_kept.append(row)
    return xs, ys, rows_kept


def _latency(key: str):
    return lambda row: (row.get("latency_ms") or {}).get(key)


def plot_latency_vs_throughput(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Closed-loop latency against achieved throughput, one colour per (system, body).

    x: throughput (2xx responses/s); y: latency in ms on a log scale, p50 solid
    and p99 dashed. Points follow the connection count (annotated) upwards.
    Runs whose mode is not "closed" are left out.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("mode", "closed") == "closed":
            groups.setdefault((str(run.get("system", "?")), str(run.get("body", "?"))), []).append(run)
    fig = _figure(8.5, 5.5)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(groups))]
    drawn = False
    for color, ((system, body), rows) in zip(colors, sorted(groups.items())):
        rows = sorted(rows, key=lambda r: r.get("connections") or 0)
        for key, style in (("p50", "-"), ("p99", "--")):
            xs, ys, kept = _points(rows, "throughput_rps", _latency(key))
            if not xs:
                continue
            drawn = True
            ax.plot(xs, ys, style, marker="o" if key == "p50" else "s", color=color, markersize=4,
                    label=f"{system} {body} {key}")
            for x, y, row in zip(xs, ys, kept):
                if key == "p50" and row.get("connections") is not None:
                    ax.annotate(str(row["connections"]), (x, y), textcoords="offset points", xytext=(3, 4),
                                fontsize=7, color=color)
    if drawn:
        _log_y(ax)
        ax.legend(fontsize=8, ncol=2)
    else:
        _no_data(ax, "no closed-loop runs with latencies")
    ax.set_xlabel("throughput (2xx responses/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("Latency vs throughput, closed loop (labels: connections; p50 solid, p99 dashed)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_batch_sizes(distributions: dict[str, dict[int, int]], path: str | Path) -> Path:
    """One bar chart per system: the share of executed batches that had each batch size.

    `distributions` maps a system to {batch size (rows): number of executions};
    keys may be strings (as after a JSON round trip). The bars are shares of
    executions, not of rows; the title gives the batch count and mean rows per batch.
    """
    systems = list(distributions) or ["(none)"]
    fig = _figure(max(4.5, 4.0 * len(systems)), 4.0)
    axes = fig.subplots(1, len(systems), sharey=True, squeeze=False)[0]
    for ax, system in zip(axes, systems):
        counts = {int(size): int(n) for size, n in (distributions.get(system) or {}).items() if int(n) > 0}
        total = sum(counts.values())
        if not total:
            _no_data(ax, "no batches")
            ax.set_title(system)
        else:
            sizes = sorted(counts)
            ax.bar(sizes, [100.0 * counts[s] / total for s in sizes], width=0.8, color="C0")
            mean_rows = sum(s * n for s, n in counts.items()) / total
            ax.set_title(f"{system}: {total} batches, mean {mean_rows:.1f} rows")
            if len(sizes) <= 16:
                ax.set_xticks(sizes)
        ax.set_xlabel("batch size (rows)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("share of executed batches (%)")
    return _save(fig, path)


def plot_step_load(series: dict[str, list[dict[str, Any]]], target_ms: float | None, path: str | Path) -> Path:
    """Step-load comparison of batching policies: p99 latency and CPU per request per offered rate.

    `series` maps a policy name to its step results (dicts with rate_rps,
    latency_ms and cpu_ms_per_request). Left: p99 latency (ms, log scale) with
    the latency target as a horizontal line; right: the machine's CPU
    milliseconds per answered request (what a policy spends that the machine
    could have served other requests with).
    """
    fig = _figure(11.0, 4.5)
    lat_ax, thr_ax = fig.subplots(1, 2)
    drawn_lat = drawn_thr = False
    offered: list[float] = []
    for i, (policy, steps) in enumerate(sorted(series.items())):
        steps = sorted(steps, key=lambda s: _number(s.get("rate_rps")) or 0.0)
        xs, ys, _ = _points(steps, "rate_rps", _latency("p99"))
        if xs:
            lat_ax.plot(xs, ys, "-o", color=f"C{i % 10}", markersize=4, label=policy)
            drawn_lat = True
        xs, ys, _ = _points(steps, "rate_rps", lambda s: s.get("cpu_ms_per_request"))
        if xs:
            thr_ax.plot(xs, ys, "-o", color=f"C{i % 10}", markersize=4, label=policy)
            drawn_thr = True
            offered += xs
    if target_ms is not None and target_ms > 0:
        lat_ax.axhline(target_ms, color="red", linestyle=":", label=f"target {target_ms:g} ms")
    if drawn_lat or (target_ms is not None and target_ms > 0):
        _log_y(lat_ax)
        lat_ax.legend(fontsize=8)
    if not drawn_lat:
        _no_data(lat_ax)
    if drawn_thr:
        thr_ax.legend(fontsize=8)
    else:
        _no_data(thr_ax)
    lat_ax.set(xlabel="offered rate (req/s)", ylabel="p99 latency (ms, log scale)", title="p99 latency per step")
    thr_ax.set(xlabel="offered rate (req/s)", ylabel="machine CPU ms per request", title="CPU per request per step")
    for ax in (lat_ax, thr_ax):
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)
