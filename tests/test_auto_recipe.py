"""The scratch recipe chosen from the data: digits get no flips and mild crops, photos a capped
size and flips; ``vitft train --preset auto`` and the Train tab's Auto button use it."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
from PIL import Image

from vitft_app.auto_recipe import PHOTO_SIZE_CAP, suggest_scratch_recipe
from vitft_app.cli import build_parser, config_from_args
from vitft_app.data import build_transforms, scan_dataset
from vitft_app.scratch import RECOMMENDED_SCRATCH_MODEL


@pytest.fixture
def photos(tmp_path):
    """2 classes x 12 noisy RGB 200x150 JPEGs (photo-like: colour, larger than 48 px)."""
    rng = np.random.default_rng(0)
    for name, base in (("ants", (150, 90, 40)), ("bees", (220, 200, 40))):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(base) + rng.normal(0, 30, (150, 200, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i:02d}.jpg")
    return tmp_path / "photos"


def test_digits_get_no_flip_and_mild_crops(digits_small):
    recipe = suggest_scratch_recipe(scan_dataset(digits_small))
    v = recipe.values
    assert v["model"] == RECOMMENDED_SCRATCH_MODEL and v["image_size"] == 32  # 28 px digits
    assert v["augment"] == "crop" and v["crop_scale_min"] >= 0.5 and v["label_smoothing"] == 0.0
    assert v["freeze_depth"] == 0 and 3 <= v["epochs"] <= 60 and v["batch_size"] == 16  # < 1,000 images
    assert "no flip" in recipe.describe()


def test_photos_get_a_capped_size_and_flips(photos):
    v = suggest_scratch_recipe(scan_dataset(photos)).values
    assert v["image_size"] == PHOTO_SIZE_CAP  # 150 px median side, capped
    assert v["augment"] == "basic" and v["lr"] == 5e-4  # few images per class: a gentler rate
    assert v["label_smoothing"] == 0.1 and v["crop_scale_min"] == 0.25


def test_crop_augmentation_never_flips(digits_small):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    names = [type(t).__name__ for t in build_transforms(processor, train=True, augment="crop").transforms]
    assert "RandomResizedCrop" in names and "RandomHorizontalFlip" not in names
    basic = [type(t).__name__ for t in build_transforms(processor, train=True, augment="basic").transforms]
    assert "RandomHorizontalFlip" in basic


def test_cli_preset_auto_fills_the_recipe_and_flags_win(digits_small):
    args = build_parser().parse_args(["train", "--data", str(digits_small), "--preset", "auto", "--epochs", "1"])
    config = config_from_args(args)
    assert config.model == RECOMMENDED_SCRATCH_MODEL and config.image_size == 32 and config.augment == "crop"
    assert config.epochs == 1  # an explicit flag overrides the preset


def test_cli_preset_auto_on_a_missing_folder_is_one_line(tmp_path, capsys):
    from vitft_app.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--preset", "auto"]) == 2
    err = capsys.readouterr().err
    assert "vitft train: error:" in err and "Traceback" not in err


def test_train_tab_auto_button_values(digits_small):
    from vitft_app.ui.train_tab import auto_preset_updates

    settings = types.SimpleNamespace(data_root=digits_small.parent, example_dir=digits_small.parent / "example")
    fields = ["model", "image_size", "augment", "epochs", "seed"]
    values, text = auto_preset_updates(str(digits_small), settings, fields)
    assert values[:3] == [RECOMMENDED_SCRATCH_MODEL, 32, "crop"] and isinstance(values[3], int)
    assert "Preset **auto**" in text and "from scratch" in text
    _, bad = auto_preset_updates("", settings, fields)
    assert bad.startswith("✗")


def test_tiny_colour_images_get_flips_and_mild_crops(tmp_path):
    rng = np.random.default_rng(1)
    for name, base in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (tmp_path / "tiny" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(np.array(base) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tiny" / name / f"{i}.png")
    v = suggest_scratch_recipe(scan_dataset(tmp_path / "tiny")).values
    assert v["image_size"] == 32 and v["augment"] == "basic" and v["crop_scale_min"] == 0.6


def _fake_report(n_train: int, mode: str, side: int, classes: int = 10):
    """A scan report with ``n_train`` training images of one PIL mode and median side (the rule reads
    only these fields)."""
    check = types.SimpleNamespace(reason=None, mode=mode)
    return types.SimpleNamespace(train=[None] * n_train, classes=[str(i) for i in range(classes)],
                                 files=[types.SimpleNamespace(check=check)] * 50,
                                 suggested_image_size=lambda: side)


def test_colour_images_get_more_passes_than_digits():
    from vitft_app.auto_recipe import COLOUR_IMAGE_VIEWS, MAX_EPOCHS, TARGET_IMAGE_VIEWS

    digits = suggest_scratch_recipe(_fake_report(4000, "L", 32)).values  # the built-in example
    cifar = suggest_scratch_recipe(_fake_report(5000, "RGB", 32)).values  # cifar10-subset
    assert digits["epochs"] == math.ceil(TARGET_IMAGE_VIEWS / 4000) == 8
    assert cifar["epochs"] == math.ceil(COLOUR_IMAGE_VIEWS / 5000) == 30
    assert cifar["augment"] == "basic" and cifar["batch_size"] == 32 and cifar["lr"] == 5e-4
    small = suggest_scratch_recipe(_fake_report(245, "RGB", 200, classes=2)).values  # hymenoptera
    assert small["epochs"] == MAX_EPOCHS and small["batch_size"] == 16 and small["image_size"] == PHOTO_SIZE_CAP
