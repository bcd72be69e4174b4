"""Result tables (markdown, CSV, JSON) and plots shared by the protocol runners.

Rows are flat dicts; :func:`aggregate` averages a metric over seeds per (method, group) and :func:`b2n_table`
prints the base / novel / HM table the papers print (HM of the *averaged* base and novel, as CoOp-family tables do).
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(rows: Iterable[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and std over the rows sharing ``keys`` (e.g. method + style), for each metric; keeps first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for key, group in groups.items():
        agg = dict(zip(keys, key))
        agg["n"] = len(group)
        for m in metrics:
            agg[m], agg[m + "_std"] = mean_std([g.get(m) for g in group])
        out.append(agg)
    return out


def b2n_table(rows: list[dict[str, Any]], *, group_key: str = "style", methods: Sequence[str] | None = None,
              groups: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Base/new/HM per method and group, plus an 'average' group; returns (table rows, markdown)."""
    agg = aggregate(rows, ["method", group_key], ["base", "new"])
    methods = list(methods or dict.fromkeys(r["method"] for r in agg))
    groups = list(groups or dict.fromkeys(r[group_key] for r in agg))
    table: list[dict[str, Any]] = []
    for m in methods:
        per = {r[group_key]: r for r in agg if r["method"] == m}
        for g in groups:
            if g in per:
                r = per[g]
                table.append({"method": m, group_key: g, "base": r["base"], "new": r["new"],
                              "hm": harmonic_mean(r["base"], r["new"]), "base_std": r["base_std"],
                              "new_std": r["new_std"], "seeds": r["n"]})
        present = [per[g] for g in groups if g in per]
        if present:
            b = statistics.fmean(r["base"] for r in present)
            n = statistics.fmean(r["new"] for r in present)
            table.append({"method": m, group_key: "average", "base": b, "new": n, "hm": harmonic_mean(b, n),
                          "base_std": float("nan"), "new_std": float("nan"), "seeds": min(r["n"] for r in present)})
    cols = groups + ["average"]
    lines = [f"| method | {' | '.join(f'{g} B / N / HM' for g in cols)} |", "|---|" + "---|" * len(cols)]
    for m in methods:
        cells = []
        for g in cols:
            r = next((t for t in table if t["method"] == m and t[group_key] == g), None)
            cells.append("-" if r is None
                         else f"{100 * r['base']:.1f} / {100 * r['new']:.1f} / **{100 * r['hm']:.1f}**")
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return table, "\n".join(lines)


#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (t_{0.975, df}); above 30, the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom (table to 30, 1.96 above); ``df`` must be >= 1."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% t interval over them: (mean, low, high); NaN bounds for one value."""
    vals = [d for d in diffs if d is not None and not math.isnan(d)]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile_975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return mean, mean - half, mean + half


def per_seed_b2n(rows: Iterable[dict[str, Any]], *, group_key: str = "style",
                 groups: Sequence[str] | None = None) -> dict[tuple[str, Any], dict[str, float]]:
    """Per (method, seed): base and new averaged over ``groups`` (every group must be present) and their HM."""
    cells: dict[tuple[str, Any], dict[str, dict[str, float]]] = defaultdict(dict)
    for r in rows:
        if groups is None or r[group_key] in groups:
            cells[(r["method"], r["seed"])][r[group_key]] = r
    out = {}
    for key, per in cells.items():
        if groups is not None and set(per) != set(groups):
            continue  # an unfinished seed: not comparable
        b = statistics.fmean(x["base"] for x in per.values())
        n = statistics.fmean(x["new"] for x in per.values())
        out[key] = {"base": b, "new": n, "hm": harmonic_mean(b, n)}
    return out


def paired_b2n_table(rows: list[dict[str, Any]], *, methods: Sequence[str], references: Sequence[str],
                     group_key: str = "style", groups: Sequence[str] | None = None) -> tuple[list[dict], str]:
    """Each method minus each reference on the seeds both have, for base, new and HM averaged over ``groups``:
    the mean difference and its 95% t interval over seeds. Returns (table rows, markdown); empty when no
    reference is among the rows."""
    per = per_seed_b2n(rows, group_key=group_key, groups=groups)
    refs = [ref for ref in references if any(m == ref for m, _ in per)]
    table: list[dict[str, Any]] = []
    for ref in refs:
        for m in methods:
            if m == ref:
                continue
            seeds = sorted({s for (mm, s) in per if mm == m} & {s for (mm, s) in per if mm == ref})
            if not seeds:
                continue
            row: dict[str, Any] = {"method": m, "reference": ref, "seeds": len(seeds)}
            for metric in ("base", "new", "hm"):
                mean, lo, hi = paired_interval([per[(m, s)][metric] - per[(ref, s)][metric] for s in seeds])
                row.update({f"d_{metric}": mean, f"d_{metric}_low": lo, f"d_{metric}_high": hi})
            table.append(row)
    if not table:
        return [], ""

    def cell(r: dict[str, Any], metric: str) -> str:
        mean, lo, hi = (100 * r[f"d_{metric}{x}"] for x in ("", "_low", "_high"))
        return f"{mean:+.1f}" if math.isnan(lo) else f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"

    lines = ["| method | reference | seeds | Δ base | Δ new | Δ HM |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['reference']} | {r['seeds']} | {cell(r, 'base')} | {cell(r, 'new')} | "
              f"**{cell(r, 'hm')}** |" for r in table]
    return table, "\n".join(lines)


def accuracy_table(rows: list[dict[str, Any]], *, group_key: str, metric: str = "accuracy",
                   methods: Sequence[str] | None = None, groups: Sequence[str] | None = None) -> tuple[list[dict], str]:
    """Mean accuracy (± std over seeds) per method and group, plus the average over groups; markdown too."""
    agg = aggregate(rows, ["method", group_key], [metric])
    methods = list(methods or dict.fromkeys(r["method"] for r in agg))
    groups = list(groups or dict.fromkeys(r[group_key] for r in agg))
    table = [r for r in agg]
    lines = [f"| method | {' | '.join(groups)} | average |", "|---|" + "---|" * (len(groups) + 1)]
    for m in methods:
        per = {r[group_key]: r for r in agg if r["method"] == m}
        vals = [per[g][metric] for g in groups if g in per]
        avg = statistics.fmean(vals) if vals else float("nan")
        table.append({"method": m, group_key: "average", metric: avg, "n": min((per[g]["n"] for g in per), default=0)})
        cells = [f"{100 * per[g][metric]:.1f} ± {100 * per[g][metric + '_std']:.1f}" if g in per else "-"
                 for g in groups]
        lines.append(f"| {m} | {' | '.join(cells)} | **{100 * avg:.1f}** |")
    return table, "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def bar_chart(path: Path, table: list[dict[str, Any]], *, group_key: str, metric: str, title: str,
              methods: Sequence[str], groups: Sequence[str], ylabel: str = "accuracy (%)") -> None:
    """Grouped bar chart: one group of bars per ``group_key`` value, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(methods)) / 2.5), 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = []
        for g in groups:
            r = next((t for t in table if t["method"] == m and t[group_key] == g), None)
            vals.append(100 * r[metric] if r is not None and r.get(metric) is not None else 0.0)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, vals, width, label=m)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=0)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(methods)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
