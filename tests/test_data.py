from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitft_app.data import (
    ImageDataset,
    build_transforms,
    collate_skipping_failures,
    ensure_example_dataset,
    processor_spec,
    scan_dataset,
    stratified_split,
)


def make_images(folder: Path, count: int, size=(12, 12), colour=128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (colour, i * 5 % 255, 0)).save(folder / f"img{i}.png")


def test_classes_are_sorted_folder_names_and_hidden_entries_ignored(tmp_path):
    for name in ("zebra", "Apple", "mango"):
        make_images(tmp_path / name, 6)
    make_images(tmp_path / ".ipynb_checkpoints", 3)
    (tmp_path / "notes.txt").write_text("not a class")
    (tmp_path / "mango" / "readme.md").write_text("not an image")
    make_images(tmp_path / "mango" / "nested", 2)  # found recursively, as torchvision does

    report = scan_dataset(tmp_path)

    assert report.classes == sorted(["zebra", "Apple", "mango"])
    assert report.ok, report.errors
    counts = report.counts().set_index("class")["total"].to_dict()
    assert counts == {"Apple": 6, "mango": 8, "zebra": 6}
    ignored = {Path(p).name for p in report.ignored}
    assert {".ipynb_checkpoints", "notes.txt", "readme.md"} <= ignored


@pytest.mark.parametrize("val_name", ["val", "validation", "valid"])
def test_given_split_is_used(tmp_path, val_name):
    for name in ("a", "b"):
        make_images(tmp_path / "train" / name, 5)
        make_images(tmp_path / val_name / name, 2)
    report = scan_dataset(tmp_path)
    assert report.split_given
    assert report.classes == ["a", "b"]
    assert len(report.train) == 10 and len(report.val) == 4
    assert all("/train/" in item.path for item in report.train)


def test_automatic_split_is_stratified_and_seeded(tmp_path):
    make_images(tmp_path / "a", 20)
    make_images(tmp_path / "b", 10)
    first = scan_dataset(tmp_path, val_fraction=0.2, seed=1)
    again = scan_dataset(tmp_path, val_fraction=0.2, seed=1)
    other = scan_dataset(tmp_path, val_fraction=0.2, seed=2)
    assert not first.split_given
    assert Counter(i.label for i in first.val) == {0: 4, 1: 2}
    assert first.val == again.val
    assert first.val != other.val
    assert not {i.path for i in first.val} & {i.path for i in first.train}


def test_split_keeps_a_training_image_for_tiny_classes():
    from vitft_app.data import ImageItem

    items = [ImageItem(f"a{i}", 0) for i in range(2)] + [ImageItem("b0", 1)]
    train, val = stratified_split(items, 0.9, seed=0)
    assert Counter(i.label for i in train) == {0: 1, 1: 1}
    assert [i.label for i in val] == [0]


def test_corrupt_files_are_skipped_and_reported(tmp_path):
    make_images(tmp_path / "a", 5)
    make_images(tmp_path / "b", 5)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    report = scan_dataset(tmp_path)
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert set(reasons) == {"broken.png", "empty.jpg"}
    assert reasons["empty.jpg"] == "empty file"
    assert all(Path(i.path).name not in reasons for i in report.train + report.val)
    assert any("2 image file(s) skipped" in w for w in report.warnings)


def test_one_class_is_an_error_with_advice(tmp_path):
    make_images(tmp_path / "only", 5)
    report = scan_dataset(tmp_path)
    assert not report.ok
    assert "at least 2" in report.errors[0]


def test_empty_class_is_left_out(tmp_path):
    make_images(tmp_path / "a", 4)
    make_images(tmp_path / "b", 4)
    (tmp_path / "c").mkdir()
    report = scan_dataset(tmp_path)
    assert report.classes == ["a", "b"]
    assert any("Empty classes" in w and "c" in w for w in report.warnings)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_dataset(tmp_path / "nope")


def test_suggested_image_size_follows_the_images(tmp_path, digits_small):
    assert scan_dataset(digits_small).suggested_image_size() == 32  # 28 px digits
    make_images(tmp_path / "photos" / "a", 2, size=(640, 480))
    make_images(tmp_path / "photos" / "b", 2, size=(640, 480))
    assert scan_dataset(tmp_path / "photos").suggested_image_size() == 224


def test_transforms_follow_the_processor():
    from transformers import ViTImageProcessor

    deit_like = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3], image_std=[1, 1, 1])
    deit_like.do_center_crop = True
    deit_like.crop_size = {"height": 40, "width": 40}
    spec = processor_spec(deit_like)
    assert spec.output_size == (40, 40) and spec.mean == (0.1, 0.2, 0.3)

    image = Image.new("RGB", (100, 60), (255, 255, 255))
    evaluated = build_transforms(deit_like, train=False)(image)
    assert evaluated.shape == (3, 40, 40) and evaluated.dtype == torch.float32
    # White (1.0) minus the processor's mean, over std 1.
    assert torch.allclose(evaluated[:, 0, 0], torch.tensor([0.9, 0.8, 0.7]), atol=1e-5)
    augmented = build_transforms(deit_like, train=True, augment="basic")(image)
    assert augmented.shape == (3, 40, 40)


def test_dataset_drops_files_that_break_after_the_scan(tmp_path, digits_small):
    from transformers import ViTImageProcessor

    report = scan_dataset(digits_small)
    broken = report.train[0].path
    Path(broken).write_bytes(b"now corrupt")
    dataset = ImageDataset(report.train[:4], build_transforms(ViTImageProcessor(size={"height": 32, "width": 32}), False))
    batch = collate_skipping_failures([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert int(batch["failed"]) == 1


def test_example_dataset_is_real_mnist_written_once(tmp_path):
    folder = ensure_example_dataset(tmp_path, per_class=3)
    report = scan_dataset(folder)
    assert report.classes == [str(d) for d in range(10)]
    assert len(report.train) + len(report.val) == 30
    assert report.ignored == []  # its own ".complete" marker is not shown as an ignored entry
    first = sorted(folder.rglob("*.png"))[0]
    mtime = first.stat().st_mtime_ns
    assert ensure_example_dataset(tmp_path, per_class=3) == folder
    assert first.stat().st_mtime_ns == mtime
    with Image.open(first) as image:
        assert image.size == (28, 28) and len(set(image.tobytes())) > 10  # a real digit, not a blank
