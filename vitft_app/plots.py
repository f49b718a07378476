"""Plotly figures: pure functions of DataFrames (no Gradio, no file access)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .baseline import Baseline, format_accuracy


def _layout(fig: go.Figure, title: str, y_title: str) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title="optimizer step",
        yaxis_title=y_title,
        template="plotly_white",
        height=320,
        margin=dict(l=50, r=20, t=50, b=40),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def _steps_from_zero(fig: go.Figure, metrics: pd.DataFrame) -> go.Figure:
    """Both live plots share one x axis, optimizer step 0 to the last step in ``metrics``, so the
    accuracy plot's few points line up under the loss plot's (with one validation point plotly
    otherwise zooms to fractional steps around it)."""
    if not metrics.empty and "step" in metrics.columns and metrics["step"].notna().any():
        fig.update_xaxes(range=[0, max(float(metrics["step"].max()), 1.0) * 1.03])
    return fig


def figure_loss(metrics: pd.DataFrame) -> go.Figure:
    """Training loss per logging step and validation loss per epoch.

    Args:
        metrics: rows of ``metrics.csv`` (columns ``kind``, ``step``, ``loss``, ``val_loss``).
    """
    fig = go.Figure()
    if not metrics.empty:
        train = metrics[metrics["kind"] == "train"]
        evals = metrics[metrics["kind"] == "eval"]
        fig.add_trace(go.Scatter(x=train["step"], y=train["loss"], mode="lines+markers", name="train loss"))
        fig.add_trace(go.Scatter(x=evals["step"], y=evals["val_loss"], mode="lines+markers", name="val loss"))
    return _steps_from_zero(_layout(fig, "Loss", "cross-entropy"), metrics)


def add_baseline_line(fig: go.Figure, baseline: Baseline) -> go.Figure:
    """Draws a validation split's majority-class rate as a dashed gray line across an accuracy
    figure, labelled ``always 'bees': 54.2%`` (:mod:`vitft_app.baseline`): a curve on that line is a
    model that learned nothing the class counts do not already say.

    Args:
        fig: a figure whose y axis is accuracy as a fraction in [0, 1] (changed in place).
        baseline: the split's :class:`~vitft_app.baseline.Baseline`.

    Returns:
        ``fig``.
    """
    fig.add_hline(y=baseline.rate, line_dash="dash", line_color="gray", line_width=1,
                  annotation_text=f"always '{baseline.majority_class}': {format_accuracy(baseline.rate)}",
                  annotation_position="bottom right", annotation_font_color="gray")
    return fig


def figure_accuracy(metrics: pd.DataFrame, baseline: Baseline | None = None) -> go.Figure:
    """Training and validation accuracy per epoch (x = optimizer step at the epoch's end), with the
    validation split's majority-class baseline as a dashed line: a val curve on that line is a model
    that has learned nothing the class counts do not already say (:mod:`vitft_app.baseline`).

    Args:
        metrics: rows of ``metrics.csv`` (columns ``kind``, ``step``, ``train_accuracy``,
            ``val_accuracy``; accuracies are fractions in [0, 1]).
        baseline: the run's validation baseline (:func:`vitft_app.baseline.run_baseline`), or None
            (no line: an older run without one, or a multi-label run).

    Returns:
        The figure; before the first validation it holds only a note saying when the curves appear.
    """
    fig = go.Figure()
    evals = metrics[metrics["kind"] == "eval"] if not metrics.empty else pd.DataFrame()
    if not evals.empty:
        fig.add_trace(go.Scatter(x=evals["step"], y=evals["train_accuracy"], mode="lines+markers", name="train accuracy"))
        fig.add_trace(go.Scatter(x=evals["step"], y=evals["val_accuracy"], mode="lines+markers", name="val accuracy"))
    fig = _steps_from_zero(_layout(fig, "Accuracy", "accuracy"), metrics)
    fig.update_yaxes(range=[0, 1.02])
    if baseline is not None:
        add_baseline_line(fig, baseline)
    if evals.empty:
        fig.update_xaxes(showticklabels=False)
        fig.add_annotation(text="train and val accuracy appear after the first epoch's validation",
                           xref="paper", yref="paper", x=0.5, y=0.75, showarrow=False, font=dict(color="gray"))
    return fig


def figure_class_counts(counts: pd.DataFrame) -> go.Figure:
    """Stacked bar chart of train and val images per class (columns ``class``, ``train``, ``val``)."""
    fig = go.Figure()
    if not counts.empty:
        fig.add_trace(go.Bar(x=counts["class"].astype(str), y=counts["train"], name="train"))
        fig.add_trace(go.Bar(x=counts["class"].astype(str), y=counts["val"], name="val"))
    fig.update_layout(
        barmode="stack",
        title="Images per class",
        xaxis_title="class",
        yaxis_title="images",
        template="plotly_white",
        height=320,
        margin=dict(l=50, r=20, t=50, b=40),
        xaxis=dict(type="category"),
    )
    return fig


def figure_image_stats(files: pd.DataFrame) -> go.Figure:
    """Histograms of usable images' widths and heights, aspect ratios (width / height), and a bar
    chart of their Pillow modes.

    Args:
        files: ``DatasetReport.file_table()`` (columns ``status``, ``width``, ``height``,
            ``aspect``, ``mode``); an empty frame gives empty axes.
    """
    fig = make_subplots(rows=1, cols=3, subplot_titles=("Size (pixels)", "Aspect ratio (w/h)", "Mode"))
    if not files.empty:
        usable = files[files["status"] == "ok"]
        fig.add_trace(go.Histogram(x=usable["width"], name="width", opacity=0.7), row=1, col=1)
        fig.add_trace(go.Histogram(x=usable["height"], name="height", opacity=0.7), row=1, col=1)
        fig.add_trace(go.Histogram(x=usable["aspect"], name="aspect", showlegend=False), row=1, col=2)
        modes = usable["mode"].value_counts()
        fig.add_trace(go.Bar(x=modes.index.astype(str), y=modes.values, name="mode", showlegend=False), row=1, col=3)
    fig.update_layout(barmode="overlay", template="plotly_white", height=300, margin=dict(l=40, r=20, t=50, b=40))
    return fig


def figure_confusion_matrix(matrix: list[list[int]], classes: list[str], normalize: bool = False) -> go.Figure:
    """Confusion-matrix heatmap: rows = true class, columns = predicted class.

    Args:
        matrix: counts ``C x C`` (``metrics["confusion_matrix"]``).
        classes: ``C`` names.
        normalize: divide each row by its total (recall on the diagonal); empty rows stay 0.
    """
    counts = np.asarray(matrix, dtype=float)
    values = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalize else counts
    text = [[f"{v:.2f}" if normalize else f"{int(v)}" for v in row] for row in values]
    fig = go.Figure(go.Heatmap(z=values, x=classes, y=classes, text=text, texttemplate="%{text}",
                               colorscale="Blues", hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>"))
    fig.update_layout(title="Confusion matrix" + (" (row-normalized)" if normalize else " (counts)"),
                      xaxis_title="predicted", yaxis_title="true", template="plotly_white", height=420,
                      yaxis=dict(autorange="reversed", type="category"), xaxis=dict(type="category"))
    return fig


def figure_reliability(bins: list[dict], ece: float) -> go.Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin, with the diagonal
    of perfect calibration (bins from ``metrics["reliability"]``)."""
    filled = [b for b in bins if b["count"]]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line=dict(dash="dash", color="gray")))
    fig.add_trace(go.Bar(x=[(b["lo"] + b["hi"]) / 2 for b in filled], y=[b["accuracy"] for b in filled],
                         width=[b["hi"] - b["lo"] for b in filled], name="accuracy", opacity=0.7,
                         customdata=[b["count"] for b in filled],
                         hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} images"))
    fig.update_layout(title=f"Reliability (ECE {ece:.4f})", xaxis_title="confidence", yaxis_title="accuracy",
                      template="plotly_white", height=360, xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1]))
    return fig


def _one_vs_rest(y_true: np.ndarray, probs: np.ndarray, classes: list[str]):
    """``(name, binary truth, score)`` per curve: the positive class only for two classes; every
    label when ``y_true`` is multi-hot ``(N, C)`` (multi-label)."""
    multi_hot = y_true.ndim == 2
    indices = [1] if len(classes) == 2 and not multi_hot else range(len(classes))
    for i in indices:
        truth = y_true[:, i].astype(int) if multi_hot else (y_true == i).astype(int)
        if 0 < truth.sum() < len(truth):
            yield classes[i], truth, probs[:, i]


def _curves_layout(fig: go.Figure, title: str, x_title: str, y_title: str) -> go.Figure:
    """One curve per class: the legend goes under the plot, in rows, and the figure grows with it
    (up to 900 pixels; past that the legend scrolls), so every class stays listed (a legend beside
    a 360-pixel plot cut off after about nine)."""
    rows = math.ceil(len(fig.data) / 2)  # two entries a row in a third of a 1400-pixel page
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white",
                      height=min(360 + 20 * rows, 900), margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0,
                                  font=dict(size=11)))
    return fig


def figure_roc(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> go.Figure:
    """ROC curves (one-vs-rest per class; the positive class for two classes), scikit-learn's
    ``roc_curve``, with each curve's AUC in the legend."""
    from sklearn.metrics import auc, roc_curve

    fig = go.Figure()
    for name, truth, score in _one_vs_rest(y_true, probs, classes):
        fpr, tpr, _ = roc_curve(truth, score)
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUC {auc(fpr, tpr):.3f})"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"), name="chance"))
    return _curves_layout(fig, "ROC", "false positive rate", "true positive rate")


def figure_precision_recall(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> go.Figure:
    """Precision-recall curves (one-vs-rest), scikit-learn's ``precision_recall_curve``, with
    average precision in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = go.Figure()
    for name, truth, score in _one_vs_rest(y_true, probs, classes):
        precision, recall, _ = precision_recall_curve(truth, score)
        ap = average_precision_score(truth, score)
        fig.add_trace(go.Scatter(x=recall, y=precision, mode="lines", name=f"{name} (AP {ap:.3f})"))
    return _curves_layout(fig, "Precision-recall", "recall", "precision")


#: What :func:`figure_compare` can plot: ``metric -> (metrics.csv kind, column, title, y axis)``.
COMPARE_METRICS = {
    "val_accuracy": ("eval", "val_accuracy", "Validation accuracy", "accuracy"),
    "val_loss": ("eval", "val_loss", "Validation loss", "cross-entropy"),
    "loss": ("train", "loss", "Training loss", "cross-entropy"),
}


def figure_compare(metrics_by_run: dict[str, pd.DataFrame], metric: str = "val_accuracy",
                   baselines: Iterable[Baseline | None] = ()) -> go.Figure:
    """One curve per run, overlaid, against the (fractional) epoch so that runs with different
    batch sizes line up.

    Args:
        metrics_by_run: ``{run name: metrics.csv frame}`` (columns ``kind``, ``epoch`` and the metric).
        metric: ``"val_accuracy"``, ``"val_loss"`` (one point per epoch) or ``"loss"`` (training
            loss per logging step), see :data:`COMPARE_METRICS`.
        baselines: the runs' validation majority-class baselines (:func:`vitft_app.baseline.run_baseline`;
            None entries are skipped). For ``"val_accuracy"`` each distinct one is a dashed line,
            as in :func:`figure_accuracy` (runs on one dataset share one line).

    Returns:
        A figure with exactly one trace per run (empty for a run without rows yet).

    Raises:
        ValueError: an unknown ``metric``.
    """
    if metric not in COMPARE_METRICS:
        raise ValueError(f"metric must be one of {list(COMPARE_METRICS)}, got {metric!r}")
    kind, column, title, y_title = COMPARE_METRICS[metric]
    fig = go.Figure()
    for name, metrics in metrics_by_run.items():
        if metrics.empty or column not in metrics.columns or "kind" not in metrics.columns:
            rows = pd.DataFrame({"epoch": [], column: []})
        else:
            rows = metrics[metrics["kind"] == kind]
        fig.add_trace(go.Scatter(x=rows["epoch"], y=rows[column], mode="lines+markers", name=str(name)))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title=y_title, template="plotly_white", height=340,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    if metric == "val_accuracy":
        fig.update_yaxes(range=[0, 1.02])
        for baseline in dict.fromkeys(b for b in baselines if b is not None):  # distinct, in order
            add_baseline_line(fig, baseline)
    return fig
