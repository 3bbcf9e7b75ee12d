import struct
import zlib

import numpy as np
import torch
from PIL import Image

from iqa.extract.preprocess import decode_image, normalise, resize_uint8


def rgb(h=12, w=20, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header_only(path, width, height):
    """A PNG whose header declares width x height: enough for PIL's decompression-bomb check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_exif_orientation_is_applied(tmp_path):
    pixels = rgb(10, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif)
    image, reason, _ = decode_image(tmp_path / "r.png")
    assert reason is None and image.size == (10, 30)  # (width, height) after rotation
    assert np.array_equal(np.asarray(image), np.rot90(pixels, k=-1))


def test_modes_become_8bit_rgb(tmp_path):
    grey = rgb()[..., 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    out, _, _ = decode_image(tmp_path / "grey.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 1], grey)

    deep = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 270).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit greyscale
    out, _, _ = decode_image(tmp_path / "deep.png")
    assert np.array_equal(np.asarray(out)[..., 0], np.round(deep / 257.0).astype(np.uint8))  # scaled, not clipped

    rgba = np.dstack([rgb(), np.zeros((12, 20), np.uint8)])
    rgba[:, :10, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    out = np.asarray(decode_image(tmp_path / "alpha.png")[0])
    assert np.array_equal(out[:, :10], rgba[:, :10, :3]) and (out[:, 10:] == 255).all()  # transparent: white

    Image.fromarray(rgb()).convert("CMYK").save(tmp_path / "cmyk.jpg")
    out, reason, _ = decode_image(tmp_path / "cmyk.jpg")
    assert reason is None and out.mode == "RGB" and out.size == (20, 12)


def test_bad_images_give_reasons(tmp_path):
    Image.fromarray(rgb(64, 64)).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image at all")
    png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # 400 M pixels, a few bytes on disk
    png_header_only(tmp_path / "big.png", 10_000, 10_000)  # over MAX_IMAGE_PIXELS: PIL only warns
    reasons = {name: decode_image(tmp_path / name)[1] for name in ["nope.jpg", "cut.jpg", "text.jpg", "bomb.png", "big.png"]}
    assert reasons["nope.jpg"] == "missing file"
    assert reasons["cut.jpg"].startswith("truncated or corrupt")
    assert reasons["text.jpg"] == "not an image"
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["big.png"].startswith("decompression bomb")
    assert decode_image(tmp_path / "whole.jpg")[1] is None


def test_resize_and_normalise_match_a_hand_computation():
    image = Image.fromarray(rgb(30, 50))
    x = resize_uint8(image, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    by_hand = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(x.numpy(), by_hand)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    normed = normalise(x[None], mean, std)[0].numpy()
    for c in range(3):
        np.testing.assert_allclose(normed[c], (by_hand[c] / 255.0 - mean[c]) / std[c], rtol=1e-6, atol=1e-6)
