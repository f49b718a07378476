"""Form widgets built from the :class:`~vitft_app.config.TrainConfig` field declarations.

One factory for the Train and Sweep tabs: the widget kind, choices (the field's ``Literal``),
bounds, step, label, hint and default all come from :func:`vitft_app.config.field_specs`, the
same declarations that ``__post_init__`` validates with and the ``vitft train`` flags are built
from. A tab decides only where a widget goes and what differs on purpose (a compact widget, a
default that depends on the chosen model).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..config import field_specs


def field_elem_id(name: str, prefix: str = "") -> str:
    """The HTML id of a field's widget: ``prefix`` + the field name with dashes (``batch-size``)."""
    return prefix + name.replace("_", "-")


def field_widget(name: str, *, compact: bool = False, elem_prefix: str = "", **overrides: Any) -> gr.components.Component:
    """The widget for one :class:`~vitft_app.config.TrainConfig` field.

    Args:
        name: the field name.
        compact: a small widget without its hint (the Sweep tab's fixed settings): a dropdown for
            choices and a number box for numbers, never a slider or radio.
        elem_prefix: prefix of the ``elem_id`` (``"sweep-"``), so two tabs' widgets differ.
        overrides: keyword arguments passed to the component as given (``value=``, ``choices=``,
            ``elem_id=``, ``scale=``, ``visible=``, ...).

    Returns:
        A ``gr.Radio`` or ``gr.Dropdown`` (choices; a dropdown also for ``choices=`` given to a
        text field), ``gr.Slider`` (metadata ``widget="slider"``),
        ``gr.Number`` (int: ``precision=0``), ``gr.Checkbox`` (bool) or ``gr.Textbox``.
    """
    spec = field_specs()[name]
    kwargs: dict[str, Any] = {"label": spec.label, "value": spec.form_default,
                              "elem_id": field_elem_id(name, elem_prefix)}
    if spec.info and not compact:
        kwargs["info"] = spec.info
    widget = spec.metadata.get("widget")
    if spec.kind is bool:
        kwargs.update(overrides)
        return gr.Checkbox(**kwargs)
    if spec.choices or widget == "dropdown" or "choices" in overrides:  # a str field offered with choices: model
        if spec.choices:
            kwargs["choices"] = list(spec.choices)
        kwargs.update(overrides)
        radio = spec.choices and not compact and widget != "dropdown" and "allow_custom_value" not in overrides
        return gr.Radio(**kwargs) if radio else gr.Dropdown(**kwargs)
    if spec.kind in (int, float):
        if widget == "slider" and not compact:
            kwargs.update(minimum=spec.minimum, maximum=spec.maximum, step=spec.metadata.get("step", 1))
            kwargs.update(overrides)
            return gr.Slider(**kwargs)
        kwargs["precision"] = 0 if spec.kind is int else None
        if spec.minimum is not None:
            kwargs["minimum"] = spec.minimum
        if spec.maximum is not None and not (compact and widget == "slider"):
            kwargs["maximum"] = spec.maximum
        kwargs.update(overrides)
        return gr.Number(**kwargs)
    kwargs.update(overrides)
    return gr.Textbox(**kwargs)


def field_row(names: list[str] | tuple[str, ...], form: dict[str, Any], **kwargs: Any) -> None:
    """One ``gr.Row`` of :func:`field_widget` s, added to ``form`` (``{field name: component}``)."""
    with gr.Row():
        for name in names:
            form[name] = field_widget(name, **kwargs)
