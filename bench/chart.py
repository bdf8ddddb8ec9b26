"""Draw docs/bench.png and the table in docs/bench.md from bench/results/summary.json.

    .venv/bin/python -m bench.chart      # needs the `bench` extra (matplotlib)

Each result is shown as a ratio to its baseline measured in the same run; the markdown table is
rewritten between the `<!-- bench:begin -->` / `<!-- bench:end -->` markers, so no figure in
docs/bench.md is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {  # the targets, as ratios (None: reported only)
    "pull_small": 0.10, "pull_large": 0.10, "read_cold": 0.8, "read_warm": 0.5,
    "save": 1.5, "rss_10_images": 1.0, "rss_100k_files": 1.0,
}


def main() -> int:
    summary = json.loads((ROOT / "bench" / "results" / "summary.json").read_text())
    results = list(summary["results"].values())
    names = [r["name"] for r in results]
    ratios = [r["ratio"] for r in results]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = []
    for r in results:
        t = TARGETS.get(r["name"])
        ok = t is None or (r["ratio"] <= t if r["lower_is_better"] else r["ratio"] >= t)
        colors.append("#4c72b0" if t is None else ("#55a868" if ok else "#c44e52"))
    bars = ax.bar(names, ratios, color=colors)
    for bar, name, ratio in zip(bars, names, ratios, strict=True):
        ax.annotate(f"{ratio:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
        t = TARGETS.get(name)
        if t is not None:
            x = bar.get_x()
            ax.hlines(t, x, x + bar.get_width(), colors="black", linestyles="dashed")
    ax.set_yscale("log")
    ax.set_ylabel("ratio to baseline (log); dashed = target")
    ax.set_title(f"layerstore vs baseline, same run ({summary['when']})")
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    out = ROOT / "docs" / "bench.png"
    fig.savefig(out, dpi=110)
    print(out)
    print(write_table(summary))
    return 0


def _fmt(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def write_table(summary: dict) -> Path:
    """Render the results as a markdown table into docs/bench.md between the markers."""
    partial = summary.get("partial_runs") or {}
    reruns = "".join(
        f"; `--only {part}` re-run at {when}" for part, when in sorted(partial.items())
    )
    rows = [
        f"Run of {summary['when']}{reruns} ({summary['host']['cpus']} CPUs), from "
        "`bench/results/summary.json`:",
        "",
        "| result | layerstore | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["results"].values():
        t = TARGETS.get(r["name"])
        met = "–" if t is None else (
            "✔" if (r["ratio"] <= t if r["lower_is_better"] else r["ratio"] >= t) else "✘"
        )
        rows.append(
            f"| {r['name']} | {_fmt(r['value'], r['unit'])} | {_fmt(r['baseline'], r['unit'])} "
            f"| {r['ratio']:.3g} | {r.get('target', '')} | {met} |"
        )
    doc = ROOT / "docs" / "bench.md"
    text = doc.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(head + begin + "\n" + "\n".join(rows) + "\n" + end + tail)
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
