"""The TrainConfig field declarations drive validation, the CLI flags and the form widgets."""

from __future__ import annotations

import argparse
import math
from typing import get_args

import gradio as gr
import pytest

from vitft_app import config as config_module
from vitft_app.cli import add_train_arguments
from vitft_app.config import SECTIONS, TrainConfig, field_specs
from vitft_app.ui.app import AppSettings, build_app
from vitft_app.ui.form import field_widget
from types import SimpleNamespace

from vitft_app.jobs import JobRunner
from vitft_app.ui import train_tab
from vitft_app.ui.app import AppContext

#: Fields not on the Train form: the dataset comes from the Data tab; the runs folder and run name
#: from the app's settings.
NOT_ON_THE_FORM = {"data_dir", "output_dir", "run_name"}


def _outside(spec):
    """A value just outside each bound of a field, with the bound's name."""
    meta = spec.metadata
    step = 1 if spec.kind is int else 1e-6
    if "ge" in meta:
        yield "ge", meta["ge"] - step
    if "gt" in meta:
        yield "gt", meta["gt"]
    if "le" in meta:
        yield "le", meta["le"] + step
    if "lt" in meta:
        yield "lt", meta["lt"]


@pytest.mark.parametrize("name", [n for n, s in field_specs().items() if s.bounds_text()])
def test_post_init_checks_the_bounds_declared_in_the_metadata(name):
    spec = field_specs()[name]
    for _, value in _outside(spec):
        with pytest.raises(ValueError, match=rf"^{name} must be .*got"):
            TrainConfig(data_dir="d", model="some/hub-model", **{name: value})
    # The widget's limits are accepted values.
    for value in (spec.minimum, spec.maximum):
        if value is not None and math.isfinite(value):
            TrainConfig(data_dir="d", model="some/hub-model", **{name: spec.kind(value)})


def test_choices_come_from_the_literal_and_are_checked():
    assert field_specs()["optimizer"].choices == get_args(config_module.Optimizer)
    assert field_specs()["augment"].choices == get_args(config_module.Augment)
    with pytest.raises(ValueError, match=r"^scheduler must be one of \['cosine', 'linear', 'constant'\], got 'step'$"):
        TrainConfig(data_dir="d", scheduler="step")


def test_every_field_has_a_known_section_and_the_messages_stay_as_they_were():
    assert {spec.section for spec in field_specs().values()} <= set(SECTIONS)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        TrainConfig(data_dir="d", batch_size=0)
    with pytest.raises(ValueError, match=r"^warmup_ratio must be in \[0, 1\), got 1$"):
        TrainConfig(data_dir="d", warmup_ratio=1)
    with pytest.raises(ValueError, match=r"^image_size must be between 32 and 1024, got 16$"):
        TrainConfig(data_dir="d", image_size=16)


def test_cli_flags_take_choices_bounds_and_groups_from_the_same_declarations():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    assert tuple(actions["scheduler"].choices) == field_specs()["scheduler"].choices
    assert "allowed: in [0, 1)" in actions["warmup_ratio"].help
    titles = {group.title: {a.dest for a in group._group_actions} for group in parser._action_groups}
    assert {"optimizer", "warmup_ratio", "ema_decay"} <= titles[SECTIONS["optimization"]]


def test_widgets_follow_the_field_declarations():
    with gr.Blocks():
        radio = field_widget("scheduler")
        compact = field_widget("scheduler", compact=True, elem_prefix="sweep-")
        ema = field_widget("ema_decay")
        freeze = field_widget("freeze_depth")
        epochs = field_widget("epochs")
    assert isinstance(radio, gr.Radio) and [c[0] for c in radio.choices] == ["cosine", "linear", "constant"]
    assert radio.elem_id == "scheduler" and radio.info == field_specs()["scheduler"].doc
    assert isinstance(compact, gr.Dropdown) and compact.elem_id == "sweep-scheduler" and compact.info is None
    assert (ema.minimum, ema.maximum, ema.value) == (0, 0.99999, 0.0)
    assert isinstance(freeze, gr.Slider) and (freeze.minimum, freeze.maximum, freeze.step) == (0, 12, 1)
    assert isinstance(epochs, gr.Number) and epochs.precision == 0 and epochs.minimum == 1 and epochs.value == 3


def test_the_train_tab_places_every_field_once_in_its_section(tmp_path, digits_small):
    settings = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs",
                           example_dir=tmp_path / "example", device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    with gr.Blocks():
        data = SimpleNamespace(chosen=gr.State(None), path=gr.Textbox(), classes=gr.State([]),
                               balance_button=gr.Button(), scan_handler=lambda path: None, outputs=[])
        tab = train_tab.build(ctx, data)
    assert set(tab.layout) | NOT_ON_THE_FORM == set(field_specs()) and set(tab.form) == set(tab.layout)
    for name, (section, _) in tab.layout.items():
        assert field_specs()[name].section == section, name
    rows = train_tab.folded_rows(tab.layout)
    assert list(rows) == ["augmentation", "optimization", "system"]
    assert rows["system"] == [["val_fraction", "seed", "log_every_steps", "num_workers", "max_nonfinite_steps"],
                              ["precision", "attention"]]


def test_train_and_sweep_tabs_build_their_fields_from_the_factory(tmp_path, digits_small):
    settings = AppSettings(data_root=digits_small.parent, runs_dir=tmp_path / "runs",
                           example_dir=tmp_path / "example", device="cpu")
    demo = build_app(settings)
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    for name, spec in field_specs().items():
        if name in NOT_ON_THE_FORM:
            continue
        widget = by_id["model-choice" if name == "model" else name.replace("_", "-")]
        assert widget.label == spec.label, name
    # The Sweep tab's fixed settings: the same fields, labels and bounds in compact widgets.
    for name in ("image_size", "epochs", "batch_size", "lr", "weight_decay", "freeze_depth", "augment", "precision"):
        sweep = by_id[f"sweep-{name.replace('_', '-')}"]
        assert sweep.label == field_specs()[name].label, name
        assert getattr(sweep, "minimum", None) == field_specs()[name].minimum, name
    assert by_id["sweep-lr"].value == 1e-3 and isinstance(by_id["sweep-precision"], gr.Dropdown)
