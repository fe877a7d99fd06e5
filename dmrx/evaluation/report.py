"""`dmrx report`: a run's figures, like the paper's, as PNG files plus an index.html, in RUN/report/.

- fig2_relevance.png (paper Figure 2): mean r (User-to-Item) and mean r_hat (Item-to-Item) on positive vs
  negative test examples, with standard errors.
- fig3_learning_curves.png (paper Figure 3): the training target loss and beta * L_NS per logged step
  (metrics.jsonl averages each over the steps since the previous line), and validation AUC.
- fig4_i2i_position.png (paper Figure 4): the Item-to-Item attention weight by position, 0 = the most
  recent behaviour. Averaged per position over the test rows whose history reaches that position (every
  real behaviour counts, padding never does). A row's weights sum to 1 over its behaviours, so short
  histories put larger weights on the recent positions whatever the model learnt: the dashed line is the
  same average for uniform attention (1 / history length), the reference the bars should be read against.
- roc.png: ROC curve (and the oracle's, when the file carries true click probabilities).
- calibration.png: reliability diagram, observed click rate vs mean prediction over equal-count bins of
  the prediction, with 95% binomial intervals and the expected calibration error.

Figures a model cannot have (relevance units and attention weights of a baseline, say) are listed as
skipped with the reason. matplotlib is optional (the `plot` extra) and drawn off-screen (Agg, no pyplot
state). The directory is written beside the run, then renamed into place: never half a report.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from dmrx.artifacts.atomic import atomic_dir, jsonable, write_json
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError
from dmrx.evaluation.metrics import relevance_means
from dmrx.evaluation.metrics import report as metric_report
from dmrx.evaluation.predict import predict
from dmrx.models import bundle

FIGURES = {
    "fig2_relevance.png": "Figure 2: mean user-to-item relevance r and r_hat on positive and negative test examples.",
    "fig3_learning_curves.png": "Figure 3: training target loss and beta * L_NS (auxiliary loss) per step; "
    "validation AUC.",
    "fig4_i2i_position.png": "Figure 4: average Item-to-Item attention weight by position (0 = most recent), over "
    "the test rows whose history reaches each position; dashed: uniform attention.",
    "roc.png": "ROC curve on the test data.",
    "calibration.png": "Reliability: observed click rate against mean prediction, equal-count bins.",
}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DmrxError(
            "dmrx report draws with matplotlib, which is not installed: install dmrx's plot "
            "extra, or pip install matplotlib"
        ) from None
    return Figure, FigureCanvasAgg


def evaluation_metrics(res: dict[str, np.ndarray]) -> dict:
    """The metrics `dmrx evaluate` prints, plus the relevance units' means on positives and negatives."""
    return {**metric_report(res["label"], res["prob"], res["user"], res.get("prob_true")), **relevance_means(res)}


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(labels) > 0
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    s, y = np.asarray(scores)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray | float]:
    """Equal-count bins of the prediction: mean prediction, observed rate, rows per bin, and the ECE."""
    order = np.argsort(probs, kind="mergesort")
    bins = [b for b in np.array_split(order, min(n_bins, len(order))) if len(b)]
    pred = np.array([probs[b].mean() for b in bins])
    obs = np.array([np.mean(labels[b] > 0) for b in bins])
    n = np.array([len(b) for b in bins], np.float64)
    ece = float((n * np.abs(obs - pred)).sum() / n.sum())
    return {"pred": pred, "obs": obs, "n": n, "ece": ece}


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise DmrxError(f"{path}: damaged training log (a line is not JSON)") from None
    return out


# ---- figures ------------------------------------------------------------------------------------------
class _Drawer:
    def __init__(self, out: Path):
        self.Figure, self.Canvas = _matplotlib()
        self.out = out

    def figure(self, w: float = 6.0, h: float = 4.0):
        fig = self.Figure(figsize=(w, h), dpi=110)
        self.Canvas(fig)
        return fig

    def save(self, fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / name, format="png")


def _fig_relevance(d: _Drawer, res: dict, metrics: dict) -> None:
    units = [(k, t) for k, t in (("r", "r  (User-to-Item)"), ("r_hat", "r_hat  (Item-to-Item)")) if k in res]
    fig = d.figure(3.2 * len(units) + 0.8, 3.8)
    pos = res["label"] > 0
    for i, (k, title) in enumerate(units):
        ax = fig.add_subplot(1, len(units), i + 1)
        vals = [res[k][pos], res[k][~pos]]
        means = [metrics[f"mean_{k}_pos"], metrics[f"mean_{k}_neg"]]
        errs = [float(v.std() / np.sqrt(len(v))) if len(v) > 1 else 0.0 for v in vals]
        names = [
            f"{name}\n{m:.4g} (n={len(v):,})" for name, m, v in zip(("positive", "negative"), means, vals, strict=True)
        ]
        ax.bar(names, means, yerr=errs, capsize=4, color=["#d62728", "#1f77b4"])
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(title)
        ax.set_ylabel(f"mean {k} (bars: standard error)")
    d.save(fig, "fig2_relevance.png")


def _fig_curves(d: _Drawer, log: list[dict], aux: bool) -> None:
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_auc" in r]
    fig = d.figure(9.0 if val else 5.5, 3.8)
    ax = fig.add_subplot(1, 2 if val else 1, 1)
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], marker="." if len(train) < 30 else None, label="target loss")
    if aux:
        ax.plot(
            steps,
            [r.get("beta_aux", 0.0) for r in train],
            marker="." if len(train) < 30 else None,
            label="beta * L_NS (auxiliary)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("learning curves")
    ax.legend()
    ax.grid(alpha=0.3)
    if val:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.plot([r["step"] for r in val], [r["val_auc"] for r in val], marker="o", color="#2ca02c")
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation AUC")
        ax2.set_title("validation AUC")
        ax2.grid(alpha=0.3)
    d.save(fig, "fig3_learning_curves.png")


def _fig_positions(d: _Drawer, res: dict) -> None:
    count = res["i2i_count"][::-1]  # position 0 = slot T-1, the most recent behaviour
    keep = np.flatnonzero(count > 0)
    pos = keep
    mean = res["i2i_sum"][::-1][keep] / count[keep]
    uniform = res["i2i_uniform"][::-1][keep] / count[keep]
    from matplotlib.ticker import MaxNLocator

    fig = d.figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(pos, mean, color="#9467bd", label="model")
    ax.plot(pos, uniform, "k--", lw=1.0, label="uniform attention (1 / length)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position (0 = most recent behaviour)")
    ax.set_ylabel("mean attention weight")
    ax.set_title("Item-to-Item attention weight by position")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    d.save(fig, "fig4_i2i_position.png")


def _fig_roc(d: _Drawer, res: dict, metrics: dict) -> None:
    fig = d.figure(4.6, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    curves = [("model", res["prob"], metrics["auc"], "#1f77b4")]
    if "prob_true" in res:
        curves.append(("oracle (true probability)", res["prob_true"], metrics.get("oracle_auc"), "#7f7f7f"))
    for name, scores, a, color in curves:
        fpr, tpr = roc_curve(res["label"], scores)
        if len(fpr) > 4000:  # plotting resolution, not the metric's
            idx = np.unique(np.linspace(0, len(fpr) - 1, 4000).astype(int))
            fpr, tpr = fpr[idx], tpr[idx]
        ax.plot(fpr, tpr, color=color, label=f"{name}: AUC {a:.4f}")
    ax.plot([0, 1], [0, 1], color="black", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    d.save(fig, "roc.png")


def _fig_calibration(d: _Drawer, res: dict, rel: dict) -> None:
    fig = d.figure(4.8, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    pred, obs, n = rel["pred"], rel["obs"], rel["n"]
    err = 1.96 * np.sqrt(np.clip(obs * (1 - obs), 1e-12, None) / n)
    top = float(max(pred.max(), obs.max(), 1e-3)) * 1.25  # intervals of sparse bins may run off the top
    ax.plot([0, top], [0, top], color="black", lw=0.6, ls=":", label="perfect calibration")
    ax.errorbar(
        pred, obs, yerr=err, marker="o", ms=4, capsize=3, color="#ff7f0e", label=f"model ({len(pred)} equal-count bins)"
    )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted CTR")
    ax.set_ylabel("observed CTR")
    ax.set_title(f"reliability  (ECE {rel['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    d.save(fig, "calibration.png")


# ---- the page -----------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _table(rows: dict, caption: str) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table><caption>{html.escape(caption)}</caption>{body}</table>"


def _page(
    run_dir: Path, data: Path, model: str, metrics: dict, summary: dict, figures: list[str], skipped: dict[str, str]
) -> str:
    figs = "".join(
        f'<figure><img src="{html.escape(n)}" alt="{html.escape(n)}">'
        f"<figcaption>{html.escape(FIGURES[n])}</figcaption></figure>"
        for n in figures
    )
    skip = "".join(f"<li>{html.escape(n)}: {html.escape(why)}</li>" for n, why in skipped.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dmrx report: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222 }}
table {{ border-collapse: collapse; margin: 0.5em 2em 1em 0; display: inline-table; vertical-align: top }}
th, td {{ border: 1px solid #ccc; padding: 2px 10px }} th {{ text-align: left; font-weight: 600 }}
td {{ text-align: right; font-variant-numeric: tabular-nums }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; max-width: 560px }}
img {{ max-width: 100%; border: 1px solid #eee }} figcaption {{ font-size: 0.85em; color: #555 }}
</style></head><body>
<h1>dmrx report: {html.escape(str(run_dir))}</h1>
<p>model <b>{html.escape(model)}</b>, test data <code>{html.escape(str(data))}</code></p>
<h2>Metrics</h2>
<div>{_table(metrics, f"test ({data.name})")}{_table(summary, "training (summary.json)")}</div>
<h2>Figures</h2>
{figs}
{f"<h3>Not drawn</h3><ul>{skip}</ul>" if skip else ""}
</body></html>
"""


def build_report(
    run: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    batch_size: int = 4096,
    n_bins: int = 10,
) -> dict:
    """Write RUN/report/ (PNG figures, index.html, metrics.json); return what was written."""
    _matplotlib()  # fail before any work when matplotlib is missing
    b = bundle.load(run)
    data_path = Path(data) if data is not None else bundle.run_data(b.path, "test.h5", config=b.config)
    with DataFile(data_path) as f:
        if not f.fields.has_label:
            raise DmrxError(f"{data_path}: examples/label is missing; the report needs labelled test data")
        res = predict(b.model, b.encoder(), f, batch_size, i2i_by_slot=True)
    if not len(res["prob"]):
        raise DmrxError(f"{data_path}: no examples; the report needs labelled test data")
    pos = res["label"] > 0
    if pos.all() or not pos.any():
        raise DmrxError(
            f"{data_path}: the labels are all {int(pos[0])}; ROC and calibration need both clicks and non-clicks"
        )
    metrics = evaluation_metrics(res)
    rel = reliability(res["label"], res["prob"], n_bins)
    metrics["ece"] = rel["ece"]
    summary_path = b.path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    log = read_log(b.path)
    model = b.model.cfg.model
    aux = bool(summary.get("aux_loss", model == "dmr"))

    figures: list[str] = []
    skipped: dict[str, str] = {}
    with atomic_dir(b.path / "report", overwrite=True) as tmp:
        d = _Drawer(tmp)

        def draw(name: str, fn, *args) -> None:
            fn(d, *args)
            figures.append(name)

        if "r" in res or "r_hat" in res:
            draw("fig2_relevance.png", _fig_relevance, res, metrics)
        else:
            skipped["fig2_relevance.png"] = f"the {model} model has no relevance units r, r_hat"
        if any("loss" in r for r in log):
            draw("fig3_learning_curves.png", _fig_curves, log, aux)
        else:
            skipped["fig3_learning_curves.png"] = (
                "metrics.jsonl has no training loss lines (fewer steps than log_every)"
            )
        if "i2i_count" in res and res["i2i_count"].sum() > 0:
            draw("fig4_i2i_position.png", _fig_positions, res)
        elif "i2i_count" in res:
            skipped["fig4_i2i_position.png"] = "no test row has any behaviour"
        else:
            skipped["fig4_i2i_position.png"] = f"the {model} model has no Item-to-Item network"
        draw("roc.png", _fig_roc, res, metrics)
        draw("calibration.png", _fig_calibration, res, rel)
        record = {
            "run": str(b.path),
            "data": str(data_path),
            "model": model,
            "test": metrics,
            "summary": summary,
            "figures": figures,
            "skipped": skipped,
        }
        write_json(tmp / "metrics.json", jsonable(record))
        (tmp / "index.html").write_text(_page(b.path, data_path, model, metrics, summary, figures, skipped))
    out = b.path / "report"
    return jsonable(
        {"dir": str(out), "index": str(out / "index.html"), "figures": figures, "skipped": skipped, "metrics": metrics}
    )
