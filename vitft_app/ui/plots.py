"""Plotly figures: pure functions of DataFrames (no Gradio, no file access)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


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
    return _layout(fig, "Loss", "cross-entropy")


def figure_accuracy(metrics: pd.DataFrame) -> go.Figure:
    """Training and validation accuracy per epoch (x = optimizer step at the epoch's end)."""
    fig = go.Figure()
    if not metrics.empty:
        evals = metrics[metrics["kind"] == "eval"]
        fig.add_trace(go.Scatter(x=evals["step"], y=evals["train_accuracy"], mode="lines+markers", name="train accuracy"))
        fig.add_trace(go.Scatter(x=evals["step"], y=evals["val_accuracy"], mode="lines+markers", name="val accuracy"))
    fig = _layout(fig, "Accuracy", "accuracy")
    fig.update_yaxes(range=[0, 1.02])
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
    from plotly.subplots import make_subplots

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
