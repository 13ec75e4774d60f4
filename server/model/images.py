"""Image decoding and preprocessing for Qwen3-VL.

The pixel pipeline reproduces transformers' ``Qwen2VLImageProcessorPil`` (the processor Qwen3-VL
uses) bit for bit on RGB input: ``smart_resize`` -> PIL BICUBIC resize -> rescale in float64 then
cast to float32 -> normalise in float32 -> patchify into the flat ``[num_patches, C*T*P*P]``
layout, with the single frame repeated ``temporal_patch_size`` times.

Decoding untrusted bytes is hardened on top of that: size caps on the encoded payload, a pixel
cap read from the header before any pixel is decoded, a forced full decode so truncated files
are caught, and a whitelist of formats. Every rejection raises ``ImageError`` (an HTTP 400).

transformers is deliberately not imported here; tests compare against it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# Formats we agree to decode; anything else is refused before a decoder plugin runs on it.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_ASPECT_RATIO = 200  # the reference's smart_resize refuses anything above this

_BICUBIC = int(Image.Resampling.BICUBIC)


class ImageError(ValueError):
    """The client sent an image we cannot or will not use (becomes an HTTP 400)."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSettings:
    """Preprocessing settings; defaults are Qwen3-VL-2B's preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # "shortest_edge" in the transformers-5 spelling
    max_pixels: int = 16777216  # "longest_edge" in the transformers-5 spelling
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = _BICUBIC
    max_encoded_bytes: int = 20 * 1024 * 1024
    max_decoded_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        # Config mistakes are server bugs, not client errors: plain ValueError, not ImageError.
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ImageSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (RGB)")
        if any(s == 0 for s in self.image_std):
            raise ValueError("image_std must not contain 0")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merged patch)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any], **overrides: Any) -> ImageSettings:
        """Read a preprocessor_config.json dict (transformers 4 or 5 spelling).

        Like the reference's ``__init__``, top-level ``min_pixels``/``max_pixels`` override
        ``size.shortest_edge``/``size.longest_edge`` when both are present. Keys missing from the
        file fall back to this class's (Qwen3-VL) defaults. ``overrides`` (e.g. the byte limits,
        which are server policy rather than model config) are applied last.
        """
        _reject_unsupported_flags(cfg)
        size = cfg.get("size") or {}
        kwargs: dict[str, Any] = {}
        min_pixels = _first_set(cfg.get("min_pixels"), size.get("shortest_edge"))
        max_pixels = _first_set(cfg.get("max_pixels"), size.get("longest_edge"))
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                kwargs[key] = _three_floats(cfg[key], key)
        if cfg.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(cfg["rescale_factor"])
        kwargs.update(overrides)
        return cls(**kwargs)

    def cache_key(self) -> str:
        """Stable text of every setting that changes pixel values (not the safety limits)."""
        # repr() of a float round-trips exactly, so distinct settings never collide.
        return (
            f"qwen2vl-img-v1|p={self.patch_size}|t={self.temporal_patch_size}|m={self.merge_size}"
            f"|min={self.min_pixels}|max={self.max_pixels}"
            f"|mean={','.join(repr(float(v)) for v in self.image_mean)}"
            f"|std={','.join(repr(float(v)) for v in self.image_std)}"
            f"|rescale={float(self.rescale_factor)!r}|resample={self.resample}"
        )


def _reject_unsupported_flags(cfg: dict[str, Any]) -> None:
    """We implement the always-on pipeline only; refuse configs that switch a step off."""
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if cfg.get(flag) is False:
            raise ValueError(f"preprocessor config sets {flag}=false, which grace-serve does not support")


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {value!r}")
    return (values[0], values[1], values[2])


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on a tensor field would raise; compare content_hash instead
class ProcessedImage:
    pixel_values: torch.Tensor  # float32 [num_patches, 3 * temporal_patch_size * patch_size**2]
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches
    content_hash: str  # sha256 hex of the source + settings.cache_key()
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Number of <|image_pad|> tokens this image expands to."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size**2)


# --------------------------------------------------------------------------------------------
# Data URLs
# --------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Decode ``data:image/...;base64,<payload>`` into raw bytes (no size over ``max_bytes``)."""
    if not isinstance(url, str):
        raise ImageError("image URL must be a string")
    if url[:5].lower() != "data:":
        scheme = url.split(":", 1)[0][:20] if ":" in url else ""
        raise ImageError(
            f"unsupported image URL scheme {scheme!r}: only 'data:image/...;base64,' URLs are accepted"
        )
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("malformed data URL: missing ',' between the header and the data")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"data URL media type must be image/*, got {media_type!r}")
    if "base64" not in params[1:]:
        raise ImageError("data URL must be base64-encoded (';base64,')")
    return _decode_base64(payload, max_bytes)


def _decode_base64(payload: str, max_bytes: int) -> bytes:
    # Refuse on length before copying or decoding anything, so a huge payload costs nothing.
    # The first bound is loose (MIME line breaks may pad the text); the second is exact.
    encoded_limit = 4 * ((max_bytes + 2) // 3)
    if len(payload) > 2 * encoded_limit:
        raise ImageError(f"image is too large: more than {max_bytes} bytes encoded")
    # each `in` is a fast scan, as is isascii(); a regex over the whole payload held the GIL
    if not payload.isascii() or any(ws in payload for ws in " \t\n\r\v\f"):
        # MIME-style line breaks are common and harmless; stripped a piece at a time
        payload = "".join(_WHITESPACE.sub("", piece) for piece in _pieces(payload))
    if len(payload) > encoded_limit:
        raise ImageError(f"image is too large: more than {max_bytes} bytes encoded")
    try:
        data = _b64decode_in_pieces(payload)
    except (binascii.Error, ValueError) as e:
        raise ImageError(
            f"invalid base64 in data URL (bad character, truncated or wrong padding): {e}"
        ) from e
    if not data:
        raise ImageError("data URL contains no image data")
    if len(data) > max_bytes:
        raise ImageError(f"image is too large: {len(data)} bytes encoded, the limit is {max_bytes}")
    return data


_B64_PIECE = 1 << 20  # characters (a multiple of 4): about a millisecond of decoding each


def _b64decode_in_pieces(payload: str) -> bytes:
    """base64.b64decode(payload, validate=True), a piece at a time: each call holds the GIL
    for its whole input, and a 20 MB image decoded at once kept the event loop waiting."""
    data = payload.rstrip("=")
    if "=" in data:
        raise binascii.Error("Discontinuous padding not allowed")
    pieces = _pieces(data) or [""]
    pieces[-1] += payload[len(data) :]  # the padding goes with the last piece, as in one call
    return b"".join(base64.b64decode(piece, validate=True) for piece in pieces)


def _pieces(text: str) -> list[str]:
    return [text[i : i + _B64_PIECE] for i in range(0, len(text), _B64_PIECE)]


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_image(data: bytes, settings: ImageSettings) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image, or raise ImageError.

    Order matters: size caps, then header-only open, then the pixel cap from the header, and
    only then the full decode (``load()``), so a decompression bomb never allocates its pixels.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("image data is empty")
    if len(data) > settings.max_encoded_bytes:
        raise ImageError(
            f"image is too large: {len(data)} bytes encoded, the limit is {settings.max_encoded_bytes}"
        )
    with _open_header(bytes(data)) as image:
        check_pixel_count(image.width, image.height, settings.max_decoded_pixels)
        _decode_pixels(image)
        image = _apply_exif_orientation(image)
        rgb = _convert_decoded(image)
    check_aspect_ratio(rgb.width, rgb.height)
    return rgb


def _open_header(data: bytes) -> Image.Image:
    """Image.open only parses the header; pixels are decoded later by load()."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own cap (~179 Mpx) fires inside open()
        raise ImageError(f"image has too many pixels: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(
            f"data is not a supported image (accepted formats: {', '.join(ALLOWED_FORMATS)})"
        ) from e
    except Exception as e:  # a malformed header can surface as many error types inside plugins
        raise ImageError(f"image data is corrupt or truncated (unreadable header: {e})") from e


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"image has too many pixels: {width}x{height} = {width * height}, the limit is {max_pixels}"
        )


def check_aspect_ratio(width: int, height: int) -> None:
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image aspect ratio is too extreme: {width}x{height} (ratio {ratio:.1f}, limit {MAX_ASPECT_RATIO})"
        )


def _decode_pixels(image: Image.Image) -> None:
    """Force a full decode; truncated or corrupt data raises here (LOAD_TRUNCATED_IMAGES is off)."""
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image has too many pixels: {e}") from e
    except Exception as e:
        raise ImageError(f"image data is corrupt or truncated: {e}") from e


def _convert_decoded(image: Image.Image) -> Image.Image:
    try:
        return to_rgb(image)
    except Exception as e:  # an exotic pixel mode PIL cannot convert
        raise ImageError(f"cannot convert image mode {image.mode!r} to RGB: {e}") from e


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    # Phones store rotation in EXIF; the model should see the picture the way people do.
    # A malformed EXIF block is not worth refusing the image over: keep it as stored.
    # In place: otherwise an upright image is copied whole (70 ms and 144 MB at 36 Mpx).
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB exactly as the reference's ``convert_to_rgb`` does.

    Transparency (an alpha band or a ``transparency`` entry, e.g. a P-mode PNG with tRNS) is
    composited onto white; everything else goes through ``convert("RGB")``. One deliberate
    difference: 16-bit greyscale (``I;16*``, e.g. 16-bit PNGs) is scaled down to 8 bits first,
    where the reference's ``convert("RGB")`` would clip every value above 255 to white.
    """
    if image.mode.startswith("I;16"):
        image = _sixteen_bit_to_l(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":  # convert would copy it unchanged (70 ms at 36 Mpx)
        return image
    return image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.uint32)
    return Image.fromarray((values >> 8).astype(np.uint8))  # 2-D uint8 -> mode "L"


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as well as possible. A line-for-line copy of the reference (including
    Python's banker's rounding in round()), raising ImageError instead of ValueError.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(
    image: Image.Image | bytes, settings: ImageSettings, content_hash: str | None = None
) -> ProcessedImage:
    """Bytes or a PIL image -> model-ready patches, grid and a cache hash.

    ``content_hash`` lets a caller that already hashed the source (e.g. before decoding) pass it
    through unchanged; otherwise it is computed here.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        rgb = load_image(data, settings)
        content_hash = content_hash or hash_bytes(data, settings)
    elif isinstance(image, Image.Image):
        check_pixel_count(image.width, image.height, settings.max_decoded_pixels)
        rgb = to_rgb(image)
        content_hash = content_hash or hash_pixels(rgb, settings)
    else:
        raise ImageError(f"unsupported image input type {type(image).__name__}")

    height, width = smart_resize(
        rgb.height, rgb.width, settings.factor, settings.min_pixels, settings.max_pixels
    )
    # Same call as the reference: PIL resize on the uint8 image (identity copy if the size is unchanged).
    resized = np.asarray(rgb.resize((width, height), resample=settings.resample))
    normalized = _rescale_and_normalize(resized, settings)
    patches, grid_h, grid_w = _patchify(normalized, settings)
    return ProcessedImage(
        pixel_values=torch.from_numpy(patches),
        grid_thw=(1, grid_h, grid_w),
        content_hash=content_hash,
        merge_size=settings.merge_size,
    )


def _rescale_and_normalize(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """uint8 HWC -> float32 HWC with the reference's exact dtypes, so results are bit-equal:
    rescale in float64 then cast to float32, then (x - mean) / std in float32."""
    scaled = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    return (scaled - mean) / std


def _patchify(image_hwc: np.ndarray, settings: ImageSettings) -> tuple[np.ndarray, int, int]:
    """Float32 HWC image -> [grid_h * grid_w, C * T * P * P] in the reference's order.

    Patches are ordered so each merge_size x merge_size block of neighbours is contiguous
    (the vision tower merges them); within a patch the layout is (channel, time, row, col).
    """
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    chw = np.transpose(image_hwc, (2, 0, 1))
    channels, height, width = chw.shape
    grid_h, grid_w = height // p, width // p
    blocks = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    blocks = np.transpose(blocks, (1, 4, 2, 5, 0, 3, 6))  # (gh/m, gw/m, m, m, C, p, p)
    # A still image is one frame repeated temporal_patch_size times.
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    flat = np.ascontiguousarray(blocks.reshape(grid_h * grid_w, channels * t * p * p), dtype=np.float32)
    return flat, grid_h, grid_w


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def hash_bytes(data: bytes, settings: ImageSettings) -> str:
    """Cache key for an encoded image: same bytes + same settings -> same pixels."""
    digest = hashlib.sha256(b"bytes\0")
    digest.update(data)
    digest.update(b"\0" + settings.cache_key().encode())
    return digest.hexdigest()


def hash_pixels(image: Image.Image, settings: ImageSettings) -> str:
    """Cache key for an in-memory image; mode and size are hashed so reshapes cannot collide."""
    digest = hashlib.sha256(f"pixels\0{image.mode}\0{image.width}x{image.height}\0".encode())
    digest.update(image.tobytes())
    digest.update(b"\0" + settings.cache_key().encode())
    return digest.hexdigest()
