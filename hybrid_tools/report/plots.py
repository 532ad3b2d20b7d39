"""Figures of a report: each dataset's main metric against tokens kept and against prefill time,
one line per method (`Configuration.method`: the setting without its budget)."""

from __future__ import annotations

from pathlib import Path

from ..configs import Entry


def prefill_axis_label(batch_sizes: list[int]) -> str:
    """A row records its batch's prefill time: per row only where every row ran alone."""
    if batch_sizes in ([], [1]):
        return "median prefill ms per row (vision + LLM)"
    return f"median prefill ms per batch (vision + LLM; batch sizes {', '.join(map(str, batch_sizes))})"


def plot_dataset(dataset: str, entries: list[Entry], metric: str | None, path: Path, tiny: bool) -> bool:
    """`metric` (the table's) vs mean tokens kept (left) and vs median prefill ms (right), for the
    entries that have it: an entry whose own main metric is another is not drawn on its scale.
    False: nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [e for e in entries if metric is not None and e.metrics.get(metric) is not None]
    if not points:
        return False
    unit = " (%)" if points[0].kind == "mcq" else ""
    batches = sorted({b for e in points for b in e.batch_sizes})
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    methods = sorted({e.config.method for e in points}, key=lambda m: (m != "vanilla", m))
    colours = {method: plt.cm.tab10(i % 10) for i, method in enumerate(methods)}
    for ax, attribute, xlabel in (
        (axes[0], "tokens_kept_mean", "mean tokens kept after pruning (text + visual)"),
        (axes[1], "prefill_ms_median", prefill_axis_label(batches)),
    ):
        for method in methods:
            series = sorted(
                ((getattr(e, attribute), e.metrics[metric], e) for e in points if e.config.method == method and getattr(e, attribute) is not None),
                key=lambda item: item[0],
            )
            if not series:
                continue
            xs, ys = [s[0] for s in series], [s[1] for s in series]
            vanilla = all(s[2].config.vanilla for s in series)
            ax.plot(xs, ys, marker="*" if vanilla else "o", markersize=11 if vanilla else 6, linestyle="-" if len(xs) > 1 else "",
                    color=colours[method], label=method, alpha=0.85)
            for x, y, entry in series:
                batch = f" (batch {'/'.join(map(str, entry.batch_sizes))})" if len(batches) > 1 else ""
                ax.annotate(entry.config.tag + batch, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for entry in points:
            if entry.config.vanilla:
                ax.axhline(entry.metrics[metric], color=colours[entry.config.method], linestyle="--", linewidth=0.8, alpha=0.6)
        ax.margins(x=0.18, y=0.12)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(f"{metric}{unit}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    title = f"{dataset}: {metric} vs tokens kept and vs prefill time"
    if tiny:
        title += "\n(tiny random-weight model: metric values are noise)"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)
    return True
