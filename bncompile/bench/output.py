"""The benchmark's outputs: its JSON (with the JSON Schema it follows) and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from bncompile.bench.report import BenchReport


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of :meth:`BenchReport.to_dict`."""
    return json.loads((Path(__file__).parent.parent / "schemas" / "bench.schema.json").read_text())


def write_json_data(data, path, *, flag: str = "--json") -> None:
    """Write ``data`` as indented JSON to ``path``, atomically (nothing half-written on failure)."""
    from bncompile._io import atomic_output

    with atomic_output(path, what="json", flag=flag) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n")


def check_outputs_or_exit(prog: str, paths: dict) -> None:
    """For a benchmark script, before its long run: every output path given (``{"--json": path, ...}``,
    None for an option not given) can be written; else one line ``PROG: error: ...`` naming the problem
    and the fix, and exit code 2."""
    import sys

    from bncompile._io import check_output_path
    from bncompile.errors import BncompileError

    for flag, path in paths.items():
        if path is None:
            continue
        try:
            check_output_path(path, what=flag.lstrip("-"), flag=flag)
        except BncompileError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None


def write_json(report: BenchReport, path) -> None:
    """Write the report as JSON, atomically."""
    from bncompile._io import atomic_output

    with atomic_output(path, what="json") as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def plot(report: BenchReport, path) -> None:
    """A bar chart, one panel per batch: median latency per variant, whiskers p10..p90, the ratio to
    ort written above each bar (log scale when the medians of a panel span more than 20x).
    matplotlib (Agg backend) is imported here only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bncompile._io import atomic_output

    batches = list(report.batches)
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.6 * len(batches)), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    order = list(report.variants)
    for ax, b in zip(axes[0], batches):
        rows = [report.result(v, b) for v in order]
        for i, r in enumerate(rows):
            if r is None or r.status != "ok":
                ax.annotate("n/a", (i, 0.02), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=8, color="gray")
                continue
            err = [[r.median_ms - r.p10_ms], [r.p90_ms - r.median_ms]]
            ax.bar(i, r.median_ms, color=colors(i % 10), yerr=err, capsize=4, ecolor="black")
            ax.text(i, r.p90_ms, f"{r.ratio:.2f}x", ha="center", va="bottom", fontsize=8)
        meds = [r.median_ms for r in rows if r is not None and r.status == "ok" and r.median_ms > 0]
        if meds and max(meds) / min(meds) > 20:     # e.g. an untuned TVM next to onnxruntime
            ax.set_yscale("log")
            ax.set_ylabel("latency per call (ms, log scale)")
        else:
            ax.set_ylabel("latency per call (ms)")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"batch {b}")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{Path(report.model).name}: median latency, whiskers p10-p90, "
                 f"label = ratio to ort ({report.threads} thread(s))", fontsize=10)
    fig.tight_layout()
    with atomic_output(path, what="plot") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
