"""The dataset doctor: every case generated with Pillow, exact outcomes asserted."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitft_app import filecheck
from vitft_app.data import scan_dataset
from vitft_app.filecheck import ScanCache
from vitft_app.images import ALPHA_BACKGROUND, ImageLoadError, load_image
from vitft_app.uploads import UnsafeArchiveError, extract_zip


def png(path: Path, colour=(200, 10, 10), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def jpeg_bytes(seed: int, size=(48, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_system_and_hidden_entries_are_ignored_not_classes(tmp_path):
    for name in ("cat", "dog"):
        for i in range(3):
            png(tmp_path / name / f"{i}.png", (i * 40, 0, 0) if name == "cat" else (0, i * 40, 0))
    png(tmp_path / ".ipynb_checkpoints" / "x.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "dog" / "Thumbs.db").write_bytes(b"\0")
    png(tmp_path / "__MACOSX" / "cat" / "._0.png")

    report = scan_dataset(tmp_path, cache=None)

    assert report.classes == ["cat", "dog"]
    assert len(report.train) + len(report.val) == 6
    ignored = {os.path.relpath(p, tmp_path) for p in report.ignored}
    assert ignored == {".ipynb_checkpoints", ".DS_Store", "cat/.DS_Store", "dog/Thumbs.db", "__MACOSX"}
    assert report.ok


def test_a_file_name_that_is_not_utf8_scans_with_the_cache_on(tmp_path):
    """The scan cache (SQLite) cannot store a surrogate-escaped name as text; such a file refused
    the whole dataset with "'utf-8' codec can't encode character '\\udcff'"."""
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        for i in range(3):
            png(data / name / f"{i}.png", (i * 50, 9, 9) if name == "cat" else (9, i * 50, 9))
    odd = data / "cat" / os.fsdecode(b"x\xff.png")
    png(odd, (250, 250, 9))
    cache = ScanCache(tmp_path / "cache.sqlite")
    for _ in range(2):  # stored, then read back from the cache
        report = scan_dataset(data, cache=cache)
        assert sum(item.path == str(odd) for item in [*report.train, *report.val]) == 1
        assert len(report.train) + len(report.val) == 7


def test_empty_classes_are_named_and_left_out(tmp_path):
    for name in ("cat", "dog"):
        for i in range(3):
            png(tmp_path / name / f"{i}.png", (i * 50, 9, 9) if name == "cat" else (9, i * 50, 9))
    (tmp_path / "bird").mkdir()
    (tmp_path / "fish").mkdir()
    (tmp_path / "fish" / "notes.txt").write_text("no images here")
    report = scan_dataset(tmp_path, cache=None)
    assert report.classes == ["cat", "dog"]
    assert "Empty classes left out (no usable images): bird, fish" in report.warnings


def test_one_class_refuses_training(tmp_path):
    for i in range(4):
        png(tmp_path / "only" / f"{i}.png", (i * 50, 0, 0))
    report = scan_dataset(tmp_path, cache=None)
    assert not report.ok
    assert any("training needs at least 2" in e for e in report.errors)


def test_broken_files_are_skipped_with_their_reasons_and_training_runs(tmp_path, tiny_vit):
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunStore
    from vitft_app.training import train

    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "data" / name / f"good{i}.jpg").write_bytes(jpeg_bytes(i + (10 if name == "dog" else 0)))
    whole = jpeg_bytes(99)
    (tmp_path / "data" / "cat" / "half.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "data" / "cat" / "zero.jpg").write_bytes(b"")
    (tmp_path / "data" / "cat" / "text.jpg").write_text("I am not a JPEG")

    report = scan_dataset(tmp_path / "data", cache=None)
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert reasons == {"half.jpg": "truncated", "zero.jpg": "empty file", "text.jpg": "not an image"}
    assert report.ok and len(report.train) + len(report.val) == 4

    config = TrainConfig(data_dir=str(tmp_path / "data"), model=str(tiny_vit), epochs=1, batch_size=2,
                         precision="fp32", val_fraction=0.5, output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    result = train(config, run_dir, lambda event: None, device="cpu")
    assert result.status == "completed" and result.steps == 1


def test_transparent_pixels_never_reach_the_model(tmp_path):
    rng = np.random.default_rng(0)
    loaded = []
    for seed in range(2):
        rgba = rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)  # random hidden colours
        rgba[..., 3] = 0
        rgba[8:24, 8:24] = (10, 20, 250, 255)  # the opaque square
        path = tmp_path / f"alpha{seed}.png"
        Image.fromarray(rgba, "RGBA").save(path)
        loaded.append(np.asarray(load_image(path)))
    assert np.array_equal(loaded[0], loaded[1])
    assert tuple(loaded[0][0, 0]) == ALPHA_BACKGROUND
    assert tuple(loaded[0][16, 16]) == (10, 20, 250)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I", "F", "I;16", "I;16B"])
def test_every_mode_becomes_8_bit_rgb(tmp_path, mode):
    base = Image.linear_gradient("L").resize((16, 16))
    if mode in ("I;16", "I;16B"):
        image = Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype("<u2" if mode == "I;16" else ">u2"))
        assert image.mode == mode
    else:
        image = base.convert(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (16, 16)


def test_sixteen_bit_gradient_keeps_its_order_and_is_not_saturated(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I")
    row = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] == 0 and row[-1] == 255
    assert len(np.unique(row)) == 256  # a gradient, not a white block


def test_exif_orientation_6_loads_the_right_way_up(tmp_path):
    stored = np.zeros((32, 64, 3), dtype=np.uint8)  # stored 64 wide, 32 high
    stored[:, :32] = (255, 0, 0)  # left half red
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "o6.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = np.asarray(load_image(path))
    assert loaded.shape[:2] == (64, 32)  # 32 wide, 64 high
    assert loaded[:16].mean(axis=(0, 1))[0] > 200  # the red half is on top after rotating clockwise


def test_huge_image_is_skipped_as_too_large_and_predict_says_so(tmp_path, digits_small, tiny_vit):
    huge = digits_small / "7" / "huge.png"
    Image.new("1", (20000, 10000), 1).save(huge)
    report = scan_dataset(digits_small, cache=None)
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert reasons["huge.png"].startswith("too large")
    assert report.ok

    from vitft_app.jobs import JobRunner
    from vitft_app.ui import predict_tab
    from vitft_app.ui.app import AppContext, AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path, device="cpu")
    ctx = AppContext(settings=settings, runner=JobRunner(settings.runs_dir, device="cpu"))
    results = predict_tab.predict_files(ctx, str(tiny_vit), [str(huge)], 3)
    assert results[0]["error"].startswith("huge.png: too large")


def test_pixel_limit_is_configurable(tmp_path):
    png(tmp_path / "a" / "big.png", size=(300, 300))
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(tmp_path / "a" / "big.png", max_pixels=200 * 200)


def test_duplicates_within_across_classes_and_across_splits(tmp_path):
    same = jpeg_bytes(1)
    for s, split in enumerate(("train", "val")):
        for n, name in enumerate(("cat", "dog")):
            for i in range(3):
                (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
                seed = 100 + 10 * (2 * s + n) + i  # distinct and the same in every process (str hash is salted)
                (tmp_path / split / name / f"{i}.jpg").write_bytes(jpeg_bytes(seed))
    (tmp_path / "train" / "cat" / "dup-a.jpg").write_bytes(same)
    (tmp_path / "train" / "cat" / "dup-b.jpg").write_bytes(same)  # same class
    conflict = jpeg_bytes(2)
    (tmp_path / "train" / "cat" / "c.jpg").write_bytes(conflict)
    (tmp_path / "train" / "dog" / "c.jpg").write_bytes(conflict)  # conflicting labels
    leak = jpeg_bytes(3)
    (tmp_path / "train" / "dog" / "leak.jpg").write_bytes(leak)
    Image.open(io.BytesIO(leak)).save(tmp_path / "val" / "dog" / "leak.png")  # same pixels, other format

    report = scan_dataset(tmp_path, cache=None)
    groups = {tuple(os.path.relpath(p, tmp_path) for p in g.paths): g.kinds for g in report.duplicates}
    assert groups == {
        ("train/cat/dup-a.jpg", "train/cat/dup-b.jpg"): ("same class",),
        ("train/cat/c.jpg", "train/dog/c.jpg"): ("conflicting labels",),
        ("train/dog/leak.jpg", "val/dog/leak.png"): ("train/val leakage",),
    }
    assert any("conflicting labels" in w for w in report.warnings)
    assert any("train/val leakage" in w for w in report.warnings)


def test_train_and_val_with_different_classes_refuse_training(tmp_path):
    for i in range(3):
        png(tmp_path / "train" / "cat" / f"{i}.png", (i * 60, 1, 1))
        png(tmp_path / "train" / "dog" / f"{i}.png", (1, i * 60, 1))
        png(tmp_path / "val" / "cat" / f"{i}.png", (i * 60, 2, 2))
        png(tmp_path / "val" / "fox" / f"{i}.png", (2, 2, i * 60))
    report = scan_dataset(tmp_path, cache=None)
    assert not report.ok
    assert any("only in train: dog" in e and "only in val: fox" in e for e in report.errors)


def test_a_class_with_one_image_refuses_training(tmp_path):
    for i in range(3):
        png(tmp_path / "cat" / f"{i}.png", (i * 60, 1, 1))
    png(tmp_path / "dog" / "0.png", (1, 200, 1))
    report = scan_dataset(tmp_path, cache=None)
    assert any("fewer than 2 usable images: dog" in e for e in report.errors)


def test_nested_folders_links_out_and_link_loops(tmp_path):
    outside = png(tmp_path / "outside" / "secret.png", (1, 2, 3))
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        for i in range(2):
            png(data / name / "deep" / "er" / f"{i}.png", (i * 90, 5, 5) if name == "cat" else (5, i * 90, 5))
    (data / "cat" / "loop").symlink_to(data / "cat")  # a link loop
    (data / "dog" / "escape.png").symlink_to(outside)  # a link out of the dataset
    (data / "dog" / "inside.png").symlink_to(data / "cat" / "deep" / "er" / "0.png")  # stays inside
    report = scan_dataset(data, cache=None)
    used = {os.path.relpath(i.path, data) for i in report.train + report.val}
    assert "dog/inside.png" in used and "cat/deep/er/0.png" in used
    assert "dog/escape.png" not in used
    ignored = {os.path.relpath(p, data) for p in report.ignored}
    assert {"cat/loop", "dog/escape.png"} <= ignored


def test_unicode_class_names_reach_id2label(tmp_path):
    from vitft_app.modeling import build_model

    names = ["café au lait", "naïve-class", "日本"]
    for n, name in enumerate(names):
        for i in range(2):
            png(tmp_path / name / f"{i}.png", (n * 80, i * 90, 3))
    report = scan_dataset(tmp_path, cache=None)
    assert report.classes == sorted(names)
    model = build_model("vit-tiny-scratch", report.classes, image_size=32).model
    assert list(model.config.id2label.values()) == sorted(names)
    assert model.config.problem_type == "single_label_classification"


def test_second_scan_decodes_nothing(tmp_path, monkeypatch):
    for name in ("cat", "dog"):
        for i in range(4):
            png(tmp_path / "data" / name / f"{i}.png", (i * 60, 7, 7) if name == "cat" else (7, i * 60, 7))
    cache = ScanCache(tmp_path / "cache.sqlite")
    calls = []
    real = filecheck.check_image_file
    monkeypatch.setattr(filecheck, "check_image_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = scan_dataset(tmp_path / "data", cache=cache)
    assert len(calls) == 8
    second = scan_dataset(tmp_path / "data", cache=ScanCache(tmp_path / "cache.sqlite"))  # a new process's view
    assert len(calls) == 8 and second.train == first.train and second.files == first.files
    png(tmp_path / "data" / "cat" / "0.png", (1, 1, 1), size=(17, 17))  # changed file: decoded again
    scan_dataset(tmp_path / "data", cache=cache)
    assert len(calls) == 9


def test_scan_report_downloads_as_csv(tmp_path):
    for name in ("cat", "dog"):
        for i in range(2):
            png(tmp_path / name / f"{i}.png", (i * 60, 3, 3) if name == "cat" else (3, i * 60, 3))
    (tmp_path / "dog" / "bad.png").write_bytes(b"x")
    report = scan_dataset(tmp_path, cache=None)
    table = report.file_table()
    assert len(table) == 5 and set(table["status"]) == {"ok", "skipped"}
    assert table.loc[table["path"] == "dog/bad.png", "reason"].item() == "not an image"
    assert report.to_csv().splitlines()[0].startswith("path,split,class,status,reason,width,height")


def _vitft_scan(*args):
    return subprocess.run([sys.executable, "-m", "vitft_app.cli", "scan", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_scan_json_and_exit_codes(tmp_path):
    for name in ("cat", "dog"):
        for i in range(3):
            png(tmp_path / "ok" / name / f"{i}.png", (i * 60, 3, 3) if name == "cat" else (3, i * 60, 3))
    (tmp_path / "ok" / "cat" / "bad.jpg").write_bytes(b"")
    result = _vitft_scan(str(tmp_path / "ok"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"classes", "counts", "skipped", "ignored", "duplicates", "warnings", "errors"} <= set(data)
    assert data["classes"] == ["cat", "dog"]
    assert data["counts"]["cat"]["train"] + data["counts"]["cat"]["val"] == 3
    assert data["skipped"] == [{"path": str(tmp_path / "ok" / "cat" / "bad.jpg"), "reason": "empty file"}]

    for i in range(3):
        png(tmp_path / "one" / "cat" / f"{i}.png", (i * 60, 3, 3))
    refused = _vitft_scan(str(tmp_path / "one"))
    assert refused.returncode == 2 and "training needs at least 2" in refused.stderr


# ---- uploads -------------------------------------------------------------------------------


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_upload_extracts_into_its_own_folder(tmp_path):
    one = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(one, "PNG")
    archive = make_zip(tmp_path / "animals.zip", {"animals/cat/a.png": one.getvalue(),
                                                  "animals/dog/b.png": one.getvalue()})
    folder = extract_zip(archive, tmp_path / "data" / "uploads")
    assert folder.name == "animals" and folder.parent.parent == tmp_path / "data" / "uploads"
    assert (folder / "cat" / "a.png").read_bytes() == one.getvalue()


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt"])
def test_zip_with_escaping_member_is_refused(tmp_path, member):
    archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"fine", member: b"gotcha"})
    with pytest.raises(UnsafeArchiveError, match="unsafe member"):
        extract_zip(archive, tmp_path / "uploads")
    assert not (tmp_path / "escape.txt").exists()
    assert not [p for p in (tmp_path / "uploads").iterdir()]  # nothing half-extracted


def test_zip_symlink_member_is_refused(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "links.zip", "w") as archive:
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(tmp_path / "links.zip", tmp_path / "uploads")


def test_zip_bomb_is_refused(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * (20 * 1024 * 1024)})  # ~1000:1
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        extract_zip(bomb, tmp_path / "uploads")
    big = make_zip(tmp_path / "big.zip", {f"f{i}.bin": os.urandom(300_000) for i in range(4)})
    with pytest.raises(UnsafeArchiveError, match="limit"):
        extract_zip(big, tmp_path / "uploads", max_total_bytes=1_000_000)
    assert not [p for p in (tmp_path / "uploads").iterdir()]


def test_upload_handler_shows_messages(tmp_path):
    from vitft_app.ui import data_tab
    from vitft_app.ui.app import AppSettings

    settings = AppSettings(data_root=tmp_path, runs_dir=tmp_path / "runs", example_dir=tmp_path / "ex")
    evil = make_zip(tmp_path / "evil.zip", {"../x.txt": b"1"})
    _, message = data_tab.receive_upload(str(evil), settings)
    assert message.startswith("✗") and "unsafe member" in message
    good = make_zip(tmp_path / "good.zip", {"cat/a.txt": b"1", "dog/b.txt": b"2"})
    path, message = data_tab.receive_upload(str(good), settings)
    assert Path(path).parent == tmp_path / "uploads" and "Extracted" in message
    assert data_tab.resolve_data_path(path, settings) == Path(path).resolve()


# ---- CSV labels ----------------------------------------------------------------------------


def test_csv_labels_single_label_trains_like_folders(tmp_path, tiny_vit):
    from vitft_app.config import TrainConfig
    from vitft_app.runs import RunStore
    from vitft_app.training import train

    rows = ["file,label"]
    for i in range(6):
        png(tmp_path / "imgs" / f"c{i}.png", (i * 40, 5, 5))
        png(tmp_path / "imgs" / f"d{i}.png", (5, i * 40, 5))
        rows += [f"imgs/c{i}.png,cat", f"imgs/d{i}.png,dog"]
    rows += ["imgs/missing.png,cat", "../outside.png,dog", "imgs/c0.png,"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    report = scan_dataset(tmp_path / "labels.csv", cache=None)
    assert report.classes == ["cat", "dog"] and not report.multi_label
    assert len(report.train) + len(report.val) == 12
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert reasons == {"missing.png": "missing file", "outside.png": "outside the dataset folder",
                       "c0.png": "no label"}

    config = TrainConfig(data_dir=str(tmp_path / "labels.csv"), model=str(tiny_vit), epochs=1, batch_size=4,
                         precision="fp32", output_dir=str(tmp_path / "runs"))
    run_dir = RunStore(config.output_dir).create_run(config)
    assert train(config, run_dir, lambda event: None, device="cpu").status == "completed"


def test_csv_with_split_column_and_multi_label(tmp_path):
    rows = ["image,labels,split"]
    for i in range(4):
        png(tmp_path / f"{i}.png", (i * 60, 1, 1))
        rows.append(f"{i}.png,{'cat;dog' if i % 2 else 'cat|bird'},{'train' if i < 3 else 'val'}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    report = scan_dataset(tmp_path / "tags.csv", cache=None)
    assert report.multi_label and report.split_given
    assert report.classes == ["bird", "cat", "dog"]
    assert [sorted(report.classes[i] for i in item.labels) for item in report.train] == [
        ["bird", "cat"], ["cat", "dog"], ["bird", "cat"]]
    assert report.counts().set_index("class")["train"].to_dict() == {"bird": 2, "cat": 3, "dog": 1}

    from vitft_app.training import prepare_data
    from vitft_app.config import TrainConfig

    # multi-label data is accepted for training (sigmoid head, BCE; see tests/test_recipe.py)
    assert prepare_data(TrainConfig(data_dir=str(tmp_path / "tags.csv")), lambda event: None).multi_label


def test_a_stray_separator_keeps_a_csv_single_label_and_a_few_multi_label_rows_are_a_warning(tmp_path):
    """One ``cat;`` typed by mistake made the whole dataset multi-label (sigmoid, mAP), said only in
    the summary; it names one label, so the dataset stays single-label. A real second label in a few
    rows still makes it multi-label, with a warning naming those rows."""
    rows = ["image,label"]
    for cls, colour in (("cat", (200, 9, 9)), ("dog", (9, 200, 9))):
        for i in range(10):
            png(tmp_path / cls / f"{i}.png", (colour[0] - i * 15, colour[1] - i * 15, 9))
            rows.append(f"{cls}/{i}.png,{cls}")
    rows[1] = "cat/0.png,cat;"
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = scan_dataset(tmp_path / "labels.csv", cache=None)
    assert not report.multi_label and report.classes == ["cat", "dog"]
    assert not any("Multi-label" in w for w in report.warnings)

    rows[2] = "cat/1.png,cat|dog"
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = scan_dataset(tmp_path / "labels.csv", cache=None)
    assert report.multi_label
    warning = next(w for w in report.warnings if w.startswith("Multi-label"))
    assert "1 of 20 rows name several labels (cat/1.png)" in warning and "typos" in warning


def test_csv_rows_with_an_unknown_or_blank_split_are_skipped_with_the_reason(tmp_path):
    """A typo ("tset"), "test", or a blank cell beside given train/val rows used to vanish without a
    word; they are skipped files with a reason, named relative to the CSV's folder."""
    rows = ["image,label,split"]
    for cls, colour in (("cat", (200, 9, 9)), ("dog", (9, 200, 9))):
        for i in range(6):
            png(tmp_path / cls / f"{i}.png", (colour[0] - i * 20, colour[1] - i * 20, 9))
            split = {3: "val", 4: "tset", 5: ""}.get(i, "train")
            rows.append(f"{cls}/{i}.png,{cls},{split}")
    rows.append("cat/0.png,cat,test")  # a test row of an image also used for training
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = scan_dataset(tmp_path / "labels.csv", cache=None)
    assert report.split_given and len(report.train) == 6 and len(report.val) == 2
    reasons = {report.relative(path): reason for path, reason in report.skipped}
    assert reasons["cat/4.png"].startswith("split 'tset' is not train or val")
    assert reasons["dog/5.png"] == "no split given (the other rows give train or val)"
    assert any(reason.startswith("split 'test' is not train or val") for reason in reasons.values())
    assert set(report.file_table()["path"]) >= {"cat/0.png", "dog/3.png"}  # relative to the CSV's folder


def test_a_csv_row_with_more_cells_than_the_header_is_refused_naming_its_line(tmp_path):
    """pandas read an extra cell in the first data row as an index column: every column shifted and
    each row was skipped as a "missing file" named after its label. A later extra cell gave
    "Error tokenizing data. C error". Both now name the line; a non-UTF-8 file says so."""
    for i in range(2):
        png(tmp_path / "a" / f"{i}.png", (i * 90, 9, 9))
    for bad_line in (2, 3):
        rows = ["image,label", "a/0.png,a", "a/1.png,a"]
        rows[bad_line - 1] += ",extra"
        (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
        with pytest.raises(ValueError, match=f"labels.csv, line {bad_line}: 3 cells, but the header has 2"):
            scan_dataset(tmp_path / "labels.csv", cache=None)
    (tmp_path / "labels.csv").write_text('image,label\n"a/0.png",a\n"a/1.png","a,b"\n')  # quoted commas are fine
    assert scan_dataset(tmp_path / "labels.csv", cache=None).classes == ["a", "a,b"]
    (tmp_path / "labels.csv").write_bytes("image,label\na/0.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(line 2, byte 0xe9\)"):  # where in the file, not in pandas' buffer
        scan_dataset(tmp_path / "labels.csv", cache=None)
    (tmp_path / "labels.csv").write_text('image,label\n"a/0.png","two\nlines"\na/1.png,a,extra\n')
    with pytest.raises(ValueError, match="labels.csv, line 4: 3 cells"):  # the file's line, past a quoted newline
        scan_dataset(tmp_path / "labels.csv", cache=None)


def test_csv_without_known_columns_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="needs an image-path column"):
        scan_dataset(tmp_path / "x.csv", cache=None)


def test_scan_cache_respects_the_pixel_limit(tmp_path):
    for name in ("cat", "dog"):
        for i in range(2):
            png(tmp_path / "data" / name / f"{i}.png", (i * 90, 1, 1) if name == "cat" else (1, i * 90, 1))
    cache = ScanCache(tmp_path / "cache.sqlite")
    strict = scan_dataset(tmp_path / "data", cache=cache, max_pixels=10)
    assert len(strict.skipped) == 4 and all(r.startswith("too large") for _, r in strict.skipped)
    relaxed = scan_dataset(tmp_path / "data", cache=cache)
    assert relaxed.skipped == [] and relaxed.ok
    assert len(scan_dataset(tmp_path / "data", cache=cache, max_pixels=10).skipped) == 4


def test_folder_upload_rebuilds_class_folders_and_refuses_bad_paths(tmp_path):
    from vitft_app.uploads import copy_folder_upload

    sources = [png(tmp_path / "tmp-upload" / f"f{i}.png", (i * 70, 0, 0)) for i in range(3)]
    rel = ["pets/cat/a.png", "pets/cat/b.png", "pets/dog/c.png"]
    folder = copy_folder_upload([str(p) for p in sources], rel, tmp_path / "uploads")
    assert folder.name == "pets" and sorted(p.name for p in folder.iterdir()) == ["cat", "dog"]
    assert (folder / "dog" / "c.png").read_bytes() == sources[2].read_bytes()
    with pytest.raises(UnsafeArchiveError, match="folder structure"):
        copy_folder_upload([str(sources[0])], [], tmp_path / "uploads")
    with pytest.raises(UnsafeArchiveError, match="unsafe path"):
        copy_folder_upload([str(sources[0])], ["../../evil.png"], tmp_path / "uploads")
    assert not (tmp_path / "evil.png").exists()


def test_animated_gif_gives_its_first_frame_and_extensions_do_not_matter(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(tmp_path / "anim.GIF").getpixel((4, 4))[0] > 200  # red: the first frame
    frames[1].save(tmp_path / "really-a-png.jpg", format="PNG")  # content and extension disagree
    assert load_image(tmp_path / "really-a-png.jpg").getpixel((4, 4)) == (0, 0, 255)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_exif_orientations_come_out_upright(tmp_path, orientation):
    # An upright picture: red top-left quadrant on a 40x20 (w x h) canvas.
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:10, :20] = (255, 0, 0)
    # Store it the way a camera would for this orientation (the inverse of exif_transpose).
    inverse = {1: [], 2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
               4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
               6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}
    stored = Image.fromarray(upright)
    for op in inverse[orientation]:
        stored = stored.transpose(op)
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    stored.save(path, exif=exif)
    loaded = np.asarray(load_image(path))
    assert loaded.shape[:2] == (20, 40)
    assert loaded[:10, :20, 0].mean() > 200 and loaded[10:, 20:, 0].mean() < 50
