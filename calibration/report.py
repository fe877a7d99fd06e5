"""The precision report: AUC, logloss, file size and CPU speed per precision, as JSON and as a rich table."""

from __future__ import annotations

from rich.table import Table


def precision_report(results: dict[str, dict]) -> dict:
    """results: precision -> {auc, logloss, bytes, rows_per_s, ...}; adds differences against fp32."""
    base = results.get("fp32", {})
    out = {}
    for prec, r in results.items():
        row = dict(r)
        if base and prec != "fp32":
            if "auc" in r and "auc" in base:
                row["auc_diff"] = r["auc"] - base["auc"]
            if "logloss" in r and base.get("logloss"):
                row["logloss_rel_diff"] = (r["logloss"] - base["logloss"]) / base["logloss"]
            if "bytes" in r and base.get("bytes"):
                row["size_ratio"] = r["bytes"] / base["bytes"]
            if r.get("rows_per_s") and base.get("rows_per_s"):
                row["speedup"] = r["rows_per_s"] / base["rows_per_s"]
        out[prec] = row
    return out


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return f"{v / 1024:,.1f} KiB" if v < 1 << 20 else f"{v / (1 << 20):,.2f} MiB"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "signed":
        return f"{v:+.5f}"
    if kind == "pct":
        return f"{100 * v:+.3f}%"
    if kind == "ratio":
        return f"{v:.3f}"
    return f"{v:.5f}"


def report_table(report: dict, title: str = "precision report") -> Table:
    table = Table(title=title)
    cols = [
        ("precision", None),
        ("AUC", "auc"),
        ("ΔAUC", "auc_diff"),
        ("logloss", "logloss"),
        ("Δlogloss", "logloss_rel_diff"),
        ("size", "bytes"),
        ("size/fp32", "size_ratio"),
        ("rows/s (CPU)", "rows_per_s"),
        ("speed/fp32", "speedup"),
    ]
    kinds = {
        "auc_diff": "signed",
        "logloss_rel_diff": "pct",
        "bytes": "bytes",
        "size_ratio": "ratio",
        "rows_per_s": "rate",
        "speedup": "ratio",
    }
    for name, _ in cols:
        table.add_column(name, justify="left" if name == "precision" else "right")
    for prec, r in report.items():
        table.add_row(prec, *[_fmt(r.get(k), kinds.get(k, "")) for _, k in cols[1:]])
    return table
