import dataclasses
import json

import pytest

from vitft_app.config import TrainConfig, field_docs


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = TrainConfig(data_dir="data", lr=1e-3, run_name="x")
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert TrainConfig.from_json_file(path) == config
    assert json.loads(config.to_json())["lr"] == 1e-3
    assert TrainConfig(data_dir="d").lr == 5e-5  # the documented default


def test_unknown_keys_ignored_on_read():
    config = TrainConfig.from_dict({"data_dir": "d", "epochs": 2, "from_a_future_version": 1})
    assert config.epochs == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1), got 1.0"),
        ({"grad_accum_steps": 0}, "grad_accum_steps must be >= 1, got 0"),
        ({"val_fraction": 0.0}, "val_fraction must be in (0, 1), got 0.0"),
        ({"freeze_depth": -1}, "freeze_depth must be >= 0, got -1"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"augment": "heavy"}, "augment must be one of"),
        ({"image_size": 16}, "image_size must be between 32 and 1024, got 16"),
        ({"image_size": 256}, "image_size for vit-tiny-scratch must be between 32 and 224, got 256"),
        ({"data_dir": " "}, "data_dir must be a folder path"),
    ],
)
def test_validation_names_field_and_value(changes, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{"data_dir": "d", **changes})
    assert message in str(info.value)


def test_config_is_frozen():
    config = TrainConfig(data_dir="d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 5  # type: ignore[misc]


def test_every_field_has_a_docstring_line():
    docs = field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(len(text) > 10 for text in docs.values()), docs
