"""The stakeholder demo of one run: its one-line summary (classes, validation accuracy beside the
majority-class baseline), example images from its validation split, and the self-contained bundle
that runs without vitft (``vitft demo RUN_DIR --bundle DIR``).

The page itself is :mod:`vitft_app.ui.demo_page`; this module never imports gradio.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from importlib.metadata import PackageNotFoundError, version
from transformers import AutoImageProcessor, AutoModelForImageClassification

from . import baseline as _baseline
from .baseline import WEAK_MARGIN
from .runs import atomic_write_text, is_run_dir, model_dir, read_status
from .config import SCRATCH_MODEL, TrainConfig
from .evaluate import EvaluationError, _split_items
from .runs_table import read_meta

logger = logging.getLogger(__name__)

#: Example images shown under the drop zone (spread over the classes).
MAX_EXAMPLES = 8
#: The bundle's template, a plain gradio + transformers script (read as text, never imported here).
BUNDLE_APP_TEMPLATE = Path(__file__).resolve().parent / "ui" / "bundle_app.py"


class DemoError(ValueError):
    """The folder cannot be demoed (not a run, or no saved model yet)."""


@dataclass(frozen=True)
class DemoSummary:
    """What the demo page says about the model.

    Attributes:
        title: the run's display name (``meta.json``) or its folder name.
        classes: class names in the model's index order.
        val_accuracy: best validation accuracy (0..1) of the saved model, or None.
        baseline: majority-class rate (0..1) of the validation split, or None when the split
            cannot be read (dataset moved) or the model is multi-label.
        majority_class: the class that always answering gives ``baseline``.
        num_val: validation images the baseline was counted on.
        examples: up to :data:`MAX_EXAMPLES` validation image paths, round-robin over classes.
        example_labels: the true class of each example.
        base_model: what the run started from (a Hub id, a folder or ``vit-tiny-scratch``).
    """

    title: str
    classes: list[str]
    val_accuracy: float | None
    baseline: float | None
    majority_class: str | None
    num_val: int
    examples: list[str] = field(default_factory=list)
    example_labels: list[str] = field(default_factory=list)
    base_model: str = ""

    @property
    def chance(self) -> float:
        """1 / number of classes."""
        return 1.0 / max(len(self.classes), 1)

    @property
    def weak(self) -> bool:
        """True when the accuracy is within :data:`WEAK_MARGIN` of the baseline (or missing)."""
        if self.val_accuracy is None:
            return True
        reference = self.baseline if self.baseline is not None else self.chance
        return self.val_accuracy < reference + WEAK_MARGIN

    def headline(self) -> str:
        """One line: classes, then validation accuracy beside the baseline."""
        shown = ", ".join(self.classes[:6]) + (f" and {len(self.classes) - 6} more" if len(self.classes) > 6 else "")
        text = f"Sorts images into {len(self.classes)} classes ({shown})."
        if self.val_accuracy is None:
            return text + " No validation accuracy recorded yet."
        text += f" Validation accuracy {self.val_accuracy:.1%}"
        if self.baseline is not None:
            text += (f"; always guessing '{self.majority_class}' gets {self.baseline:.1%}"
                     f" ({self.num_val} validation images).")
        else:
            text += f"; chance is {self.chance:.1%} (the validation split could not be read for its baseline)."
        return text

    def warning(self) -> str | None:
        """The plain weak-model warning, or None for a model clearly above its baseline."""
        if not self.weak:
            return None
        if self.val_accuracy is None:
            return "Weak model: it has no validation accuracy yet, so nothing says its answers are right."
        if self.baseline is not None:
            where = "below" if self.val_accuracy < self.baseline - 0.005 else "about"
            return (f"Weak model: {self.val_accuracy:.1%} validation accuracy is {where} what always answering"
                    f" '{self.majority_class}' gives ({self.baseline:.1%}). Do not trust its answers; train longer,"
                    " from a pretrained model, or with more images.")
        return (f"Weak model: {self.val_accuracy:.1%} is close to chance ({self.chance:.1%}). Do not trust its"
                " answers.")


def majority_baseline(labels: Sequence[str]) -> tuple[str | None, float | None]:
    """The majority-class rate of a split: always answering its most common class.

    Args:
        labels: one class name per image of the split.

    Returns:
        ``(class, rate 0..1)``; ``(None, None)`` for an empty split. Ties go to the first class
        in sorted order, so the answer does not depend on the image order. The counting and the
        weak-model margin are :mod:`vitft_app.baseline`'s, as everywhere else in the app.
    """
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    found = _baseline.majority_baseline((index[label] for label in labels), names)
    return (found.majority_class, found.rate) if found is not None else (None, None)


def _spread_examples(items: Sequence[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Round-robin over classes (sorted), in path order within a class, up to ``limit``."""
    by_class: dict[str, list[str]] = {}
    for path, label in sorted(items):
        by_class.setdefault(label, []).append(path)
    picked: list[tuple[str, str]] = []
    while len(picked) < limit and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < limit:
                picked.append((by_class[label].pop(0), label))
    return picked


def demo_summary(run_dir: str | os.PathLike, max_examples: int = MAX_EXAMPLES) -> DemoSummary:
    """Reads a run for its demo page.

    The baseline is counted from the run's validation split (the same split as training and
    evaluation: the dataset's val/ folder, or the seeded automatic split with the run's
    ``val_fraction`` and ``seed``).

    Args:
        run_dir: a run folder with a saved model.
        max_examples: validation images to offer as examples.

    Returns:
        A :class:`DemoSummary`.

    Raises:
        DemoError: not a run folder, or no saved model yet.
    """

    run_dir = Path(run_dir).expanduser()
    if not is_run_dir(run_dir):
        raise DemoError(f"Not a run folder: {run_dir} (give a folder under your runs folder)")
    folder = model_dir(run_dir)
    if folder is None:
        raise DemoError(f"No saved model in {run_dir} yet (a run saves one after its first epoch).")
    model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # timm checkpoints (TimmWrapperConfig) save their class names as label_names, not id2label.
    id2label = {int(k): v for k, v in (model_config.get("id2label")
                                       or dict(enumerate(model_config.get("label_names") or []))).items()}
    classes = [id2label[i] for i in sorted(id2label)]
    multi_label = model_config.get("problem_type") == "multi_label_classification"
    status = read_status(run_dir)
    config = TrainConfig.from_json_file(run_dir / "config.json")
    baseline = majority = None
    num_val = 0
    examples: list[tuple[str, str]] = []
    try:
        items, data_classes = _split_items(config, config.data_dir, "val")
        labelled = [(item.path, data_classes[item.label]) for item in items]
        num_val = len(labelled)
        if not multi_label:
            majority, baseline = majority_baseline([label for _, label in labelled])
        examples = _spread_examples(labelled, max_examples)
    except (EvaluationError, OSError, ValueError) as exc:
        logger.info("demo of %s without its validation split: %s", run_dir, exc)
    accuracy = status.best_val_accuracy
    return DemoSummary(
        title=read_meta(run_dir).get("name") or run_dir.name,
        classes=classes,
        val_accuracy=float(accuracy) if accuracy is not None else None,
        baseline=baseline,
        majority_class=majority,
        num_val=num_val,
        examples=[path for path, _ in examples],
        example_labels=[label for _, label in examples],
        base_model=config.model,
    )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


#: Minimum versions in the bundle's requirements.txt (the versions vitft is tested with are pinned
#: in the README's Space header; these are the oldest with the APIs app.py uses).
BUNDLE_REQUIREMENTS = ("torch>=2.1", "torchvision>=0.16", "transformers>=4.40", "gradio>=5.0", "pillow>=10.0",
                       "safetensors>=0.4", "numpy")


def write_bundle(run_dir: str | os.PathLike, out_dir: str | os.PathLike, max_examples: int = MAX_EXAMPLES) -> Path:
    """Writes a self-contained demo folder for a run, runnable without vitft and pushable as a
    Hugging Face Space::

        DIR/app.py            plain gradio + transformers + torch + pillow
        DIR/requirements.txt
        DIR/README.md         Space YAML header (sdk: gradio, app_file: app.py) and how to run
        DIR/demo.json         title, summary line, weak-model warning, examples
        DIR/model/            config.json, model.safetensors, preprocessor_config.json (no pickle)
        DIR/examples/         validation images to click

    Args:
        run_dir: a run folder with a saved model.
        out_dir: the folder to write; must be missing or empty.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DemoError: not a run, no saved model, or ``out_dir`` is a non-empty folder or a file.
    """
    summary = demo_summary(run_dir, max_examples)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DemoError(f"{out} exists and is not an empty folder; choose a new folder for the bundle.")
    out.mkdir(parents=True, exist_ok=True)
    source = model_dir(run_dir)
    # Loaded and saved again rather than copied: always safetensors and a clean config, whatever the
    # run folder holds (transformers reads a .bin with torch.load(weights_only=True)).
    model = AutoModelForImageClassification.from_pretrained(source)
    model.save_pretrained(out / "model", safe_serialization=True)
    AutoImageProcessor.from_pretrained(source).save_pretrained(out / "model")
    examples = []
    (out / "examples").mkdir()
    for index, (path, label) in enumerate(zip(summary.examples, summary.example_labels)):
        target = out / "examples" / f"{index:02d}-{_safe_name(label)}{Path(path).suffix.lower()}"
        shutil.copyfile(path, target)
        examples.append({"file": f"examples/{target.name}", "label": label})
    info = {"title": summary.title, "headline": summary.headline(), "warning": summary.warning(),
            "classes": summary.classes, "examples": examples, "val_accuracy": summary.val_accuracy,
            "baseline": summary.baseline, "majority_class": summary.majority_class}
    atomic_write_text(out / "demo.json", json.dumps(info, indent=2))
    shutil.copyfile(BUNDLE_APP_TEMPLATE, out / "app.py")
    atomic_write_text(out / "requirements.txt", "\n".join(BUNDLE_REQUIREMENTS) + "\n")
    atomic_write_text(out / "README.md", _bundle_readme(summary))
    return out


def _bundle_readme(summary: DemoSummary) -> str:
    """The bundle's README: the Space YAML header, then what it is and how to run or push it."""
    title = summary.title.replace('"', "'")[:60]
    header = ["---", f'title: "{title}"', "colorFrom: blue", "colorTo: indigo", "sdk: gradio"]
    if _gradio_version():
        header.append(f"sdk_version: {_gradio_version()}")
    header += ["app_file: app.py", "pinned: false", "---", ""]
    warning = summary.warning()
    lines = [
        f"# {summary.title}", "", summary.headline(), "",
        *([f"**{warning}**", ""] if warning else []),
        f"An image classifier trained with vitft (from {_describe_base(summary.base_model)}). This folder runs on its own:"
        " it needs neither vitft nor the training data.", "",
        "## Run it", "", "```bash", "pip install -r requirements.txt && python app.py", "```", "",
        "Then open http://127.0.0.1:7860 (`python app.py --host 0.0.0.0 --port 8080` to choose; on a machine"
        " without a GPU, install PyTorch's CPU build first: `pip install torch torchvision --index-url"
        " https://download.pytorch.org/whl/cpu`).", "",
        "## Push it as a Hugging Face Space", "",
        "The YAML header above makes this folder a Gradio Space (`sdk: gradio`, `app_file: app.py`).", "",
        "```bash", "hf auth login", "hf repo create YOUR-NAME/SPACE-NAME --repo-type space --space_sdk gradio",
        "hf upload YOUR-NAME/SPACE-NAME . --repo-type space", "```", "",
        "## Files", "",
        "- `app.py`: the page (gradio + transformers + torch + pillow)",
        "- `model/`: `config.json` (class names in `id2label`), `model.safetensors`, `preprocessor_config.json`",
        "- `examples/`: images from the model's validation split, to click",
        "- `demo.json`: title, summary line and the examples' true classes", "",
        "## Limits", "",
        "The accuracy above was measured on a validation split drawn from the same folder as the training"
        " images; on other kinds of images it can be much lower. The model always answers one of its"
        f" {len(summary.classes)} classes, even for an image of something else.", "",
    ]
    return "\n".join(header + lines)


def _describe_base(model: str) -> str:
    """A Hub id as given; a local folder by its name only (the bundle must not leak local paths)."""
    if model == SCRATCH_MODEL:
        return "random weights, `vit-tiny-scratch`"
    if model.startswith(("/", "~", ".")) or Path(model).expanduser().exists():
        return f"a local model folder, `{Path(model).name}`"
    return f"`{model}`"


def _gradio_version() -> str | None:
    """The installed gradio's version (read from package metadata: gradio is not imported)."""
    try:
        return version("gradio")
    except PackageNotFoundError:
        return None
