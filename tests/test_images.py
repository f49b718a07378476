import io

import numpy as np
import pytest
from PIL import Image

from vitft_app.images import ALPHA_BACKGROUND, ImageLoadError, is_image_file, load_image


def test_grayscale_png_becomes_rgb(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (10, 6), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 6)
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    # 20x10 image, left half red; orientation 6 = rotate 90 degrees clockwise when shown.
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = (255, 0, 0)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (10, 20)
    # After rotating clockwise the former left half is on top.
    top = np.asarray(loaded)[:5].mean(axis=(0, 1))
    bottom = np.asarray(loaded)[-5:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 60


def test_transparent_pixels_are_composited_over_background(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 255, 0, 0))  # fully transparent green
    path = tmp_path / "alpha.png"
    rgba.save(path)
    assert load_image(path).getpixel((1, 1)) == ALPHA_BACKGROUND


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    gradient = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    values = np.asarray(load_image(path))[..., 0]
    # Divided by 257 (65535 -> 255): true brightness kept, nothing clipped to white.
    assert np.array_equal(values, np.round(gradient / 257).astype(np.uint8))
    assert len(np.unique(values)) > 150  # still a gradient


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"this is not an image at all", "not an image")],
)
def test_bad_files_raise_typed_errors(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == reason


def test_truncated_jpeg_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "truncated"


def test_bytes_and_file_objects_use_the_same_loader():
    buffer = io.BytesIO()
    Image.new("P", (3, 3), 1).save(buffer, "GIF")
    assert load_image(buffer.getvalue()).mode == "RGB"
    buffer.seek(0)
    assert load_image(buffer).size == (3, 3)


def test_extension_check_is_case_insensitive():
    assert is_image_file("a/B.JPG") and is_image_file("x.webp") and is_image_file("x.TIFF")
    assert not is_image_file("notes.txt") and not is_image_file(".hidden.png")
