import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import ImageDecodeError, decode_image, sniff_extension


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(size=(64, 48)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size[1], 1)), np.tile(y[:, None], (1, size[0])),
                    np.full((size[1], size[0]), 90, np.uint8)], axis=-1)
    return Image.fromarray(rgb, "RGB")


@pytest.mark.parametrize("fmt,mode,ext", [
    ("JPEG", "RGB", "jpg"), ("JPEG", "L", "jpg"), ("JPEG", "CMYK", "jpg"),
    ("PNG", "RGB", "png"), ("PNG", "RGBA", "png"), ("PNG", "LA", "png"), ("PNG", "P", "png"),
    ("PNG", "I;16", "png"), ("PNG", "1", "png"), ("GIF", "P", "gif"), ("BMP", "RGB", "bmp"),
    ("WEBP", "RGB", "webp"), ("TIFF", "RGB", "tif"), ("TIFF", "CMYK", "tif"),
])
def test_every_format_and_mode_decodes_to_rgb(fmt, mode, ext):
    source = gradient()
    if mode == "I;16":
        source = Image.fromarray(np.asarray(source.convert("L"), np.uint16) * 257)
    elif mode != "RGB":
        source = source.convert(mode)
    data = encode(source, fmt)
    assert sniff_extension(data[:16]) == ext
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (64, 48)
    pixels = np.asarray(image, dtype=np.int16)
    assert pixels.std() > 10  # real content survived, not a blank canvas


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((40, 40), 65535, np.uint16)
    array[:20] = 0
    image = decode_image(encode(Image.fromarray(array), "PNG"))
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [255, 255, 255]


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    pixels = np.asarray(decode_image(encode(rgba, "PNG")))
    assert pixels[0, 0].tolist() == [0, 0, 255]
    assert pixels[0, 39].tolist() == [255, 255, 255]
    palette = rgba.convert("P")  # palette with a transparent index
    assert "transparency" in Image.open(io.BytesIO(encode(palette, "PNG"))).info
    assert np.asarray(decode_image(encode(palette, "PNG")))[0, 39].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    image = gradient((60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = np.asarray(decode_image(encode(image, "JPEG", exif=exif.tobytes())), float)
    assert decoded.shape == (60, 30, 3)
    clockwise = np.asarray(image.transpose(Image.Transpose.ROTATE_270), float)
    counter = np.asarray(image.transpose(Image.Transpose.ROTATE_90), float)
    assert np.abs(decoded - clockwise).mean() < 4 < np.abs(decoded - counter).mean()


def test_draft_decoding_keeps_requested_minimum_side():
    data = encode(gradient((800, 600)), "JPEG")
    small = decode_image(data, min_side=100)
    assert min(small.size) >= 100 and small.size[0] < 800


@pytest.mark.parametrize("data,reason", [
    (b"", "not_image"),
    (b"<html><body>404 Not Found</body></html>", "not_image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "not_image"),
])
def test_garbage_fails_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason


def test_truncated_jpeg_and_png_fail():
    for fmt in ("JPEG", "PNG"):
        data = encode(gradient((200, 200)), fmt)
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data[: len(data) * 6 // 10])
        assert info.value.reason in ("truncated", "undecodable")


def test_too_small_and_bomb_headers_are_rejected_before_decoding():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(encode(gradient((20, 20)), "PNG"), min_size=32)
    assert info.value.reason == "too_small"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(encode(gradient((100, 100)), "PNG"), max_pixels=5000)
    assert info.value.reason == "bomb"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_header(100_000, 100_000))
    assert info.value.reason == "bomb"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but carries no pixel data: a decompression-bomb header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
