"""Tests for server.model.images: equality with transformers' Qwen2VLImageProcessorPil, format
handling, refusal of bad input, and content hashing."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from server.model.images import (
    ImageError,
    ImageSettings,
    ProcessedImage,
    decode_data_url,
    load_image,
    preprocess_image,
    smart_resize,
)

# (min_pixels, max_pixels): GRACE training, a tiny demo model, and the Qwen3-VL-2B release config.
PIXEL_LIMITS = [(784, 200704), (784, 64 * 32 * 32), (65536, 16777216)]
# (width, height): tiny, sub-patch, exact, odd, photo, very tall, very wide, big.
SIZES = [(1, 1), (5, 7), (28, 28), (100, 37), (640, 480), (37, 1200), (2000, 30), (1500, 1000)]


def settings_for(min_pixels: int = 784, max_pixels: int = 200704, **kw) -> ImageSettings:
    return ImageSettings(min_pixels=min_pixels, max_pixels=max_pixels, **kw)


@cache
def reference(min_pixels: int = 784, max_pixels: int = 200704):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def smooth_rgb(width: int, height: int) -> Image.Image:
    """Gradient image: compresses well and survives lossy formats recognisably."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), mode="RGB")


def encode(image: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def assert_matches_reference(ours: ProcessedImage, ref_input: Image.Image, min_pixels: int, max_pixels: int):
    ref = reference(min_pixels, max_pixels)(images=[ref_input], return_tensors="pt")
    assert ours.grid_thw == tuple(ref["image_grid_thw"][0].tolist())
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert (ours.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------
# Equality with the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("min_pixels", "max_pixels"), PIXEL_LIMITS)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_matches_reference(width: int, height: int, min_pixels: int, max_pixels: int):
    image = random_rgb(width, height, seed=width * 7919 + height)
    ours = preprocess_image(image, settings_for(min_pixels, max_pixels))
    assert_matches_reference(ours, image, min_pixels, max_pixels)
    t, h, w = ours.grid_thw
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert ours.pixel_values.shape == (h * w, 3 * 2 * 16 * 16)
    assert ours.num_tokens == h * w // 4
    assert min_pixels <= h * w * 16 * 16 <= max(max_pixels, 32 * 32)


def test_temporal_dimension_repeats_the_frame():
    ours = preprocess_image(random_rgb(64, 64), settings_for())
    per_patch = ours.pixel_values.view(-1, 3, 2, 16, 16)
    assert torch.equal(per_patch[:, :, 0], per_patch[:, :, 1])


@pytest.mark.parametrize(
    ("height", "width", "factor", "min_pixels", "max_pixels"),
    [
        (1, 1, 32, 784, 200704),
        (7, 5, 32, 784, 65536),
        (30, 2000, 32, 784, 200704),
        (480, 640, 28, 3136, 1003520),
    ],
)
def test_smart_resize_matches_reference(height, width, factor, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_smart_resize

    assert smart_resize(height, width, factor, min_pixels, max_pixels) == ref_smart_resize(
        height, width, factor, min_pixels, max_pixels
    )


def test_rgba_pil_input_matches_reference():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), mode="RGBA")
    assert_matches_reference(preprocess_image(image, settings_for()), image, 784, 200704)


# ------------------------------------------------------------------------------------------
# Formats and modes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "save_kw"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("JPEG", {"quality": 90}), ("BMP", {})],
)
def test_formats_decode_like_reference(fmt: str, save_kw: dict):
    data = encode(smooth_rgb(120, 80), fmt, **save_kw)
    ours = preprocess_image(data, settings_for())
    assert ours.grid_thw == (1, 4, 8)  # 80x120 rounds to 64x128 = 4x8 patches of 16
    # The decoders are deterministic, so even lossy formats match the reference on the decoded image.
    assert_matches_reference(ours, Image.open(io.BytesIO(data)), 784, 200704)


def test_lossless_formats_equal_the_source_pixels():
    source = random_rgb(90, 60)
    expected = preprocess_image(source, settings_for()).pixel_values
    for fmt, kw in [("PNG", {}), ("WEBP", {"lossless": True})]:
        assert torch.equal(preprocess_image(encode(source, fmt, **kw), settings_for()).pixel_values, expected)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    image = load_image(data, settings_for())
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 0, 0)


def test_rgba_png_composited_on_white_like_reference():
    arr = np.zeros((40, 60, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red ...
    arr[:, :30, 3] = 255  # ... opaque on the left half, fully transparent on the right
    data = encode(Image.fromarray(arr, mode="RGBA"), "PNG")
    image = load_image(data, settings_for())
    assert image.mode == "RGB"
    assert image.getpixel((10, 10)) == (255, 0, 0)
    assert image.getpixel((50, 10)) == (255, 255, 255)
    assert_matches_reference(
        preprocess_image(data, settings_for()), Image.open(io.BytesIO(data)), 784, 200704
    )


@pytest.mark.parametrize("mode", ["L", "P", "P-transparent", "LA", "1"])
def test_png_modes_match_reference(mode: str):
    base = smooth_rgb(50, 30)
    if mode == "P-transparent":
        image = base.convert("P")
        image.info["transparency"] = 0
    else:
        image = base.convert(mode)
    data = encode(image, "PNG")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == mode.split("-")[0]
    assert load_image(data, settings_for()).mode == "RGB"
    assert_matches_reference(preprocess_image(data, settings_for()), decoded, 784, 200704)


def test_cmyk_jpeg_matches_reference():
    data = encode(smooth_rgb(64, 48).convert("CMYK"), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_matches_reference(
        preprocess_image(data, settings_for()), Image.open(io.BytesIO(data)), 784, 200704
    )


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    red = np.asarray(load_image(data, settings_for()))[0, :, 0]
    assert red.tolist() == [0, 0, 1, 156, 255]


def test_exif_rotated_jpeg_is_turned_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    data = encode(smooth_rgb(80, 40), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (80, 40)
    assert load_image(data, settings_for()).size == (40, 80)
    assert preprocess_image(data, settings_for()).grid_thw == (1, 4, 2)  # tall now


def test_an_upright_rgb_image_is_decoded_without_whole_frame_copies(monkeypatch):
    """An upright RGB image went through two copies of its decoded frame (EXIF transpose, then
    convert to the mode it had): 140 ms and 288 MB at 36 Mpx. Counted by Image.copy and
    Image.convert calls, which are what made them."""
    calls: list[str] = []
    for name in ("copy", "convert"):
        original = getattr(Image.Image, name)
        monkeypatch.setattr(
            Image.Image,
            name,
            lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k),
        )
    data = encode(random_rgb(64, 48), "PNG")
    image = load_image(data, settings_for())
    assert calls == [] and image.mode == "RGB" and image.size == (64, 48)
    assert np.array_equal(np.asarray(image), np.asarray(random_rgb(64, 48)))


def test_tiny_images_scale_up():
    for width, height in [(1, 1), (5, 7), (3, 1)]:
        data = encode(random_rgb(width, height), "PNG")
        ours = preprocess_image(data, settings_for())
        _, h, w = ours.grid_thw
        assert h * w * 256 >= 784 and ours.num_tokens >= 1


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_aspect_ratio_over_200_refused_like_reference():
    image = random_rgb(500, 2)
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(image, settings_for())
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(encode(image, "PNG"), settings_for())
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(2, 500, 32, 784, 200704)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference()(images=[image], return_tensors="pt")


def test_random_bytes_refused():
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(data, settings_for())


def test_empty_bytes_refused():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", settings_for())


def test_unlisted_format_refused():
    data = encode(smooth_rgb(20, 20), "TIFF")
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(data, settings_for())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_file_refused(fmt: str):
    data = encode(random_rgb(200, 150), fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2], settings_for())


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int) -> bytes:
    """A real side x side 1-bit black PNG: tens of KB on disk, side**2 pixels when decoded."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 500) for _ in range(side // 500)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("side", "fragment"),
    [(8000, "too many pixels: 8000x8000"), (20000, "too many pixels")],  # ours (64 Mpx) / PIL's own cap
)
def test_decompression_bomb_refused_from_header(side: int, fragment: str, monkeypatch):
    data = bomb_png(side)
    assert len(data) < 200_000

    def must_not_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", must_not_decode)
    with pytest.raises(ImageError, match=fragment):
        load_image(data, settings_for())


def test_pixel_limit_is_configurable():
    data = encode(smooth_rgb(100, 100), "PNG")
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(data, settings_for(max_decoded_pixels=9_999))
    with pytest.raises(ImageError, match="too many pixels"):
        preprocess_image(smooth_rgb(100, 100), settings_for(max_decoded_pixels=9_999))
    assert load_image(data, settings_for(max_decoded_pixels=10_000)).size == (100, 100)


def test_oversized_payload_refused():
    data = encode(random_rgb(100, 100), "PNG")
    with pytest.raises(ImageError, match="too large"):
        load_image(data, settings_for(max_encoded_bytes=len(data) - 1))
    url = "data:image/png;base64," + base64.encodebytes(data).decode()  # MIME-wrapped
    assert decode_data_url(url, max_bytes=len(data)) == data  # exactly at the limit is fine
    with pytest.raises(ImageError, match="too large"):
        decode_data_url(url, max_bytes=len(data) - 1)
    huge = "data:image/png;base64," + "A" * 4_000_000
    with pytest.raises(ImageError, match="too large"):
        decode_data_url(huge, max_bytes=1_000_000)


# ------------------------------------------------------------------------------------------
# Data URLs
# ------------------------------------------------------------------------------------------


def test_data_url_round_trip():
    data = encode(smooth_rgb(30, 20), "PNG")
    b64 = base64.b64encode(data).decode()
    assert decode_data_url(f"data:image/png;base64,{b64}", 10**6) == data
    assert decode_data_url(f"DATA:image/PNG;BASE64,{b64}", 10**6) == data
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks
    assert decode_data_url(f"data:image/png;base64,{wrapped}", 10**6) == data


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("https://example.com/cat.png", "scheme 'https'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("iVBORw0KGgo=", "scheme"),
        ("data:image/png;base64", "missing ','"),
        ("data:image/png,rawbytes", "base64"),
        ("data:text/plain;base64,aGVsbG8=", "image/"),
        ("data:image/png;base64,", "no image data"),
        ("data:image/png;base64,iVBORw0KGgo!!!!", "invalid base64"),
    ],
)
def test_bad_data_urls_refused(url: str, fragment: str):
    with pytest.raises(ImageError, match=fragment):
        decode_data_url(url, 10**6)


def test_truncated_base64_refused():
    b64 = base64.b64encode(encode(smooth_rgb(30, 20), "PNG")).decode()
    for cut in (1, 2, 3):
        with pytest.raises(ImageError, match="invalid base64"):
            decode_data_url("data:image/png;base64," + b64[:-cut], 10**6)


# ------------------------------------------------------------------------------------------
# Settings and hashing
# ------------------------------------------------------------------------------------------


def test_settings_from_both_config_spellings():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3}
    configs = [
        {**common, "size": {"shortest_edge": 65536, "longest_edge": 16777216}},
        {**common, "min_pixels": 784, "max_pixels": 200704},
        {
            **common,
            "size": {"shortest_edge": 65536, "longest_edge": 16777216},
            "min_pixels": 784,
            "max_pixels": 200704,
        },
    ]
    for cfg in configs:
        ours = ImageSettings.from_preprocessor_config(cfg)
        ref = Qwen2VLImageProcessorPil(**{**cfg, "size": dict(cfg.get("size", {})) or None})
        assert (ours.min_pixels, ours.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    assert ImageSettings.from_preprocessor_config(configs[2]).min_pixels == 784  # top level wins


def test_settings_read_every_field():
    cfg = {
        "size": {"shortest_edge": 3136, "longest_edge": 1003520},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 0.00392156862745098,
        "resample": 3,
    }
    settings = ImageSettings.from_preprocessor_config(cfg, max_encoded_bytes=1234)
    assert settings.patch_size == 14 and settings.factor == 28
    assert settings.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert settings.image_std == (0.26862954, 0.26130258, 0.27577711)
    assert settings.max_encoded_bytes == 1234
    with pytest.raises(ValueError, match="do_normalize"):
        ImageSettings.from_preprocessor_config({**cfg, "do_normalize": False})


def test_clip_mean_std_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = {"min_pixels": 3136, "max_pixels": 401408, "patch_size": 14}
    image = random_rgb(333, 222)
    ours = preprocess_image(image, ImageSettings.from_preprocessor_config(cfg)).pixel_values
    defaults = ImageSettings()
    ref = Qwen2VLImageProcessorPil(
        **cfg, image_mean=list(defaults.image_mean), image_std=list(defaults.image_std)
    )
    ref_clip = Qwen2VLImageProcessorPil(**cfg)  # its own CLIP mean/std: must differ from ours
    assert torch.equal(ours, ref(images=[image], return_tensors="pt")["pixel_values"])
    assert not torch.equal(ours, ref_clip(images=[image], return_tensors="pt")["pixel_values"])


def test_content_hash():
    data = encode(random_rgb(64, 48), "PNG")
    other = encode(random_rgb(64, 48, seed=1), "PNG")
    base, small = settings_for(), settings_for(max_pixels=64 * 32 * 32)
    first = preprocess_image(data, base).content_hash
    assert len(first) == 64 and int(first, 16) >= 0
    assert preprocess_image(data, base).content_hash == first
    assert preprocess_image(data, settings_for(max_encoded_bytes=10**6)).content_hash == first  # limits only
    assert preprocess_image(data, small).content_hash != first
    assert preprocess_image(other, base).content_hash != first
    assert preprocess_image(data, base, content_hash="given").content_hash == "given"
    assert base.cache_key() == settings_for().cache_key()
    assert base.cache_key() != settings_for(image_std=(0.5, 0.5, 0.25)).cache_key()


def test_content_hash_for_pil_input():
    image = random_rgb(40, 30)
    first = preprocess_image(image, settings_for()).content_hash
    assert preprocess_image(image.copy(), settings_for()).content_hash == first
    assert preprocess_image(random_rgb(40, 30, seed=9), settings_for()).content_hash != first
    assert preprocess_image(image, settings_for(max_pixels=64 * 32 * 32)).content_hash != first


def test_base64_in_pieces_is_exactly_base64_validate():
    """The piecewise decoder (it lets the event loop run between pieces) accepts and refuses
    exactly what base64.b64decode(validate=True) does, with the piece size cut to 4 and 8 so
    every input crosses pieces: all strings up to 9 characters over A/Q/=, and random ones."""
    import binascii
    import itertools
    import random

    import server.model.images as images

    def outcome(fn, s):
        try:
            return fn(s)
        except (binascii.Error, ValueError):
            return "refused"

    reference = lambda s: base64.b64decode(s, validate=True)  # noqa: E731
    rng = random.Random(0)
    randoms = ["".join(rng.choice("AQz+/=!") for _ in range(rng.randint(0, 24))) for _ in range(3000)]
    for piece in (4, 8):
        images._B64_PIECE, saved = piece, images._B64_PIECE
        try:
            for s in [*("".join(t) for n in range(10) for t in itertools.product("AQ=", repeat=n)), *randoms]:
                assert outcome(images._b64decode_in_pieces, s) == outcome(reference, s), (piece, s)
        finally:
            images._B64_PIECE = saved
