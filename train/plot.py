"""`loss.png` beside a run's `log.jsonl`: training and held-out loss against step.

Drawn with matplotlib's Agg canvas (no display, no global pyplot state) and written atomically (a temporary
file renamed over the old plot). matplotlib is optional: without it a run trains as before and warns once.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _figure_class():
    """matplotlib's Figure, or None (with one warning) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png plot (pip install matplotlib)", stacklevel=3)
        return None
    return Figure


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_loss_plot(log: str | Path, out: str | Path | None = None) -> Path | None:
    """Plots `log` (JSON lines with step, loss and sometimes eval_loss) to `out` (default: loss.png beside the
    log). Returns the PNG path, or None when there is nothing to plot or no matplotlib."""
    log = Path(log)
    out = Path(out) if out is not None else log.with_name("loss.png")
    entries = read_log(log)
    figure_class = _figure_class() if entries else None
    if figure_class is None:
        return None
    fig = figure_class(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], label="train loss", linewidth=1)
    held_out = [e for e in entries if "eval_loss" in e]
    if held_out:
        ax.plot([e["step"] for e in held_out], [e["eval_loss"] for e in held_out], "o-", label="held-out loss")
    if all(e["loss"] > 0 for e in entries) and all(e["eval_loss"] > 0 for e in held_out):
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(str(log.parent))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    partial = out.with_name(f".{out.name}.partial")
    fig.savefig(partial, format="png", dpi=100)
    os.replace(partial, out)
    return out
