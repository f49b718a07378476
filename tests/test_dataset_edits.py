"""Fixing a dataset in place: move / exclude with a journal, undo, refusals, the scan after edits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from vitft_app.data import scan_dataset
from vitft_app.dataset_edits import (
    JOURNAL_NAME, EditError, active_edits, check_editable, current_data_path, exclude, journal_frame,
    move_to_class, read_journal, undo_all, undo_last,
)
from vitft_app.filecheck import ScanCache


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_move_exclude_journal_and_undo_round_trip(digits_small):
    root = digits_small
    before = _listing(root)
    a, b = sorted((root / "0").iterdir())[:2]
    moved = move_to_class(root, [str(a)], "7")
    assert (root / "7" / a.name).is_file() and not a.exists()
    assert moved.moved == ((str(a), str(root / "7" / a.name)),)
    excluded = exclude(root, [str(b)])
    assert (root / "_excluded" / "0" / b.name).is_file() and not b.exists()
    journal = read_journal(root)
    assert [e["action"] for e in journal] == ["move", "exclude"]
    assert journal[0]["moves"] == [[f"0/{a.name}", f"7/{a.name}"]] and journal[0]["class"] == "7"
    assert [e["id"] for e in active_edits(root)] == [moved.edit_id, excluded.edit_id]

    # The scan sees the move, ignores _excluded/ and the journal (listed as ignored, never a class).
    report = scan_dataset(root, cache=ScanCache(None))
    labels = {Path(i.path).name: report.classes[i.label] for i in report.train + report.val}
    assert report.classes == ["0", "1", "7"]
    assert labels[a.name] == "7" and b.name not in labels
    assert len(report.train) + len(report.val) == 59
    assert str(root / "_excluded") in report.ignored and str(root / JOURNAL_NAME) in report.ignored

    undone = undo_last(root)
    assert undone.edit_id == excluded.edit_id and b.is_file()
    assert undo_all(root)[0].edit_id == moved.edit_id and a.is_file()
    assert undo_last(root) is None
    after = [p for p in _listing(root) if p != JOURNAL_NAME]
    assert after == before
    journal = read_journal(root)  # append-only: the two edits, then the two undos
    assert [(e["action"], e.get("undoes")) for e in journal] == [
        ("move", None), ("exclude", None), ("undo", excluded.edit_id), ("undo", moved.edit_id)]
    table = journal_frame(root)
    assert list(table["action"]) == ["undo", "undo", "exclude", "move"] and not table["in effect"].any()
    assert table["files"].iloc[3] == f"0/{a.name}" and table["to"].iloc[0] == f"edit {moved.edit_id}"


def test_split_layout_keeps_the_split_and_excluded_mirrors_the_path(tmp_path, digits_small):
    root = tmp_path / "split"
    for part in ("train", "val"):
        for name in ("0", "1"):
            (root / part / name).mkdir(parents=True)
            for p in sorted((digits_small / name).iterdir())[:4]:
                shutil.copy(p, root / part / name / p.name)
    image = sorted((root / "val" / "0").iterdir())[0]
    move_to_class(root, [str(image)], "1")
    assert (root / "val" / "1" / image.name).is_file()
    other = sorted((root / "train" / "1").iterdir())[0]
    exclude(root, [str(other)])
    assert (root / "_excluded" / "train" / "1" / other.name).is_file()
    report = scan_dataset(root, cache=ScanCache(None))
    assert report.split_given and len(report.train) == 7 and len(report.val) == 8
    undo_all(root)
    assert image.is_file() and other.is_file()


def test_refuses_paths_outside_the_dataset_clashes_and_unknown_classes(tmp_path, digits_small):
    root = digits_small
    outside = tmp_path / "outside.png"
    shutil.copy(sorted((root / "0").iterdir())[0], outside)
    with pytest.raises(EditError, match="not inside the dataset"):
        exclude(root, [str(outside)])
    with pytest.raises(EditError, match="not inside the dataset"):
        exclude(root, [str(root / "0" / ".." / ".." / "outside.png")])
    link = root / "0" / "link.png"
    link.symlink_to(outside)
    with pytest.raises(EditError, match="not inside the dataset"):
        exclude(root, [str(link)])
    link.unlink()
    with pytest.raises(EditError, match="no class folder"):
        move_to_class(root, [str(sorted((root / "0").iterdir())[0])], "9")
    with pytest.raises(EditError, match="not a usable class name"):
        move_to_class(root, [str(sorted((root / "0").iterdir())[0])], "../x")
    # A name clash: the same file name already in the target class. Nothing moves, not even the
    # other selected image.
    first, second = sorted((root / "0").iterdir())[:2]
    shutil.copy(first, root / "7" / first.name)
    with pytest.raises(EditError, match="already exists"):
        move_to_class(root, [str(second), str(first)], "7")
    assert first.is_file() and second.is_file() and not (root / "7" / second.name).exists()
    assert read_journal(root) == []
    # Undo refuses to overwrite a file that took the old place; the edit stays in effect.
    exclude(root, [str(second)])
    shutil.copy(first, second)
    with pytest.raises(EditError, match="already exists"):
        undo_last(root)
    assert len(active_edits(root)) == 1 and (root / "_excluded" / "0" / second.name).is_file()
    with pytest.raises(EditError, match="already excluded"):
        exclude(root, [str(root / "_excluded" / "0" / second.name)])
    with pytest.raises(EditError, match="Select at least one"):
        exclude(root, [])


def test_check_editable_allows_only_the_given_roots(tmp_path, digits_small):
    assert check_editable(digits_small, [tmp_path]) == digits_small.resolve()
    with pytest.raises(EditError, match="outside the data folders"):
        check_editable(digits_small, [tmp_path / "elsewhere"])


def test_csv_dataset_writes_a_new_csv_and_undo_switches_back(tmp_path, digits_small):
    rows = [{"image": f"{name}/{p.name}", "label": name}
            for name in ("0", "1") for p in sorted((digits_small / name).iterdir())[:5]]
    csv = digits_small / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    original = csv.read_text()
    files_before = _listing(digits_small)
    first = digits_small / rows[0]["image"]
    second = digits_small / rows[1]["image"]

    moved = move_to_class(csv, [str(first)], "1")
    assert Path(moved.data_path).name == "labels.edit-1.csv"
    assert current_data_path(csv) == moved.data_path
    dropped = exclude(csv, [str(second)])
    assert Path(dropped.data_path).name == "labels.edit-2.csv"
    assert current_data_path(csv) == current_data_path(moved.data_path) == dropped.data_path
    assert csv.read_text() == original  # the old CSV is never rewritten
    edited = pd.read_csv(dropped.data_path, dtype=str)
    assert len(edited) == 9 and rows[1]["image"] not in set(edited["image"])
    assert edited.set_index("image").loc[rows[0]["image"], "label"] == "1"
    report = scan_dataset(dropped.data_path, cache=ScanCache(None))
    assert len(report.train) + len(report.val) == 9
    # Image files are not touched by CSV edits.
    assert [p for p in _listing(digits_small) if "labels" not in p and p != JOURNAL_NAME] == \
        [p for p in files_before if "labels" not in p]

    assert Path(undo_last(csv).data_path).name == "labels.edit-1.csv"
    assert Path(undo_last(dropped.data_path).data_path).name == "labels.csv"
    assert current_data_path(dropped.data_path) == str(csv.resolve())
    with pytest.raises(EditError, match="Not in labels.csv"):
        exclude(csv, [str(digits_small / "7" / sorted((digits_small / "7").iterdir())[0].name)])
    # A third edit after the undos gets a fresh name; the journal is still append-only JSON lines.
    third = exclude(csv, [str(second)])
    assert Path(third.data_path).name == "labels.edit-5.csv"
    lines = (digits_small / JOURNAL_NAME).read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["move", "exclude", "undo", "undo", "exclude"]


def test_scan_cache_sees_moves(tmp_path, digits_small):
    cache = ScanCache(tmp_path / "scan.sqlite")
    scan_dataset(digits_small, cache=cache)
    image = sorted((digits_small / "1").iterdir())[0]
    move_to_class(digits_small, [str(image)], "0")
    report = scan_dataset(digits_small, cache=cache)
    by_name = {Path(r.path).name: r for r in report.files}
    assert by_name[image.name].class_name == "0" and by_name[image.name].path == str(digits_small / "0" / image.name)
    assert all(Path(r.path).exists() for r in report.files)
    undo_last(digits_small)
    report = scan_dataset(digits_small, cache=cache)
    assert {Path(r.path).name: r.class_name for r in report.files}[image.name] == "1"
