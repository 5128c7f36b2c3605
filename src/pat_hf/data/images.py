"""Every PIL image mode to the RGB image a model expects: :func:`to_rgb`.

``PIL.Image.convert("RGB")`` is right for 8-bit modes but not for the others: a 16-bit PNG (``I;16``, or ``I``
from older Pillow) is clipped to 255, so it reaches the model saturated to white; a float image (``F``) in
[0, 1] becomes black; ``La`` cannot be converted at all; transparent pixels keep whatever colour they hold. The
rules here:

============================  =====================================================================================
mode                          becomes
============================  =====================================================================================
``RGB``                       itself
``1``, ``L``, ``P``, ``RGBX``,  PIL's conversion (grey replicated, palette looked up, CMYK / YCbCr / HSV converted)
``CMYK``, ``YCbCr``, ``HSV``
``LAB``                       converted through a CIE L*a*b* -> sRGB colour transform (PIL's own conversion copies
                              the channels)
``LA``, ``La``, ``PA``,         composited on the background (white unless given); a palette with a transparent
``RGBA``, ``RGBa``,             index likewise
``P`` with transparency
``I;16``, ``I;16B``,            16-bit values scaled to 8 bits: v * 255 / 65535, rounded
``I;16L``, ``I;16N``
``I`` (32-bit integer)        read from a file (PNG, TIFF: 16-bit data): as 16-bit; in memory: as 8-bit when every
                              value lies in [0, 255], as 16-bit when in [0, 65535]; other values are refused
``F`` (32-bit float)          [0, 1] scaled by 255; [0, 255] kept; other values (negative, NaN, infinite) refused
anything else                 PIL's conversion when it has one, else :class:`~pat_hf.errors.ImageLoadError`
============================  =====================================================================================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ImageLoadError

__all__ = ["DEFAULT_BACKGROUND", "to_rgb"]

# Transparent pixels are shown on white: what an image viewer shows, and what a photo of a cut-out object has.
DEFAULT_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


def _describe(where: str | None) -> str:
    return f" ({where})" if where else ""


def _from_levels(levels: np.ndarray, scale: float) -> Any:
    from PIL import Image

    grey = np.clip(np.rint(levels.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _integer_to_rgb(image: Any, where: str | None) -> Any:
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT or image.format is not None:
        # 16-bit data (a PNG or TIFF read as "I" keeps its 16-bit values in int32).
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ImageLoadError(
                f"Image of mode {image.mode!r}{_describe(where)} holds values {low}..{high}, outside the 16-bit "
                "range 0..65535: pat_hf cannot tell how to show it as an 8-bit RGB image. Convert it first."
            )
        return _from_levels(values, 255.0 / 65535.0)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low >= 0 and high <= 255:
        return _from_levels(values, 1.0)
    if low >= 0 and high <= 65535:
        return _from_levels(values, 255.0 / 65535.0)
    raise ImageLoadError(
        f"Image of mode 'I' (32-bit integers){_describe(where)} holds values {low}..{high}: neither 8-bit (0..255) "
        "nor 16-bit (0..65535) data, so pat_hf cannot tell how to show it as an 8-bit RGB image. Scale it to "
        "0..255 (mode 'L' or 'RGB') first."
    )


def _float_to_rgb(image: Any, where: str | None) -> Any:
    values = np.asarray(image, dtype=np.float64)
    if values.size and not np.isfinite(values).all():
        raise ImageLoadError(
            f"Image of mode 'F' (32-bit float){_describe(where)} holds NaN or infinite values: replace them first."
        )
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0 and high <= 1:
        return _from_levels(values, 255.0)
    if low >= 0 and high <= 255:
        return _from_levels(values, 1.0)
    raise ImageLoadError(
        f"Image of mode 'F' (32-bit float){_describe(where)} holds values {low:g}..{high:g}: neither [0, 1] nor "
        "[0, 255], so pat_hf cannot tell how to show it as an 8-bit RGB image. Scale it to [0, 1] first."
    )


def _lab_to_rgb(image: Any) -> Any:
    from PIL import ImageCms

    transform = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    return ImageCms.applyTransform(image, transform)


def _composite(image: Any, background: tuple[int, int, int]) -> Any:
    from PIL import Image

    # Premultiplied modes ("La", "RGBa") first become straight alpha; "LA" / "PA" go through RGBA.
    rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(image: Any, *, background: tuple[int, int, int] = DEFAULT_BACKGROUND, where: str | None = None) -> Any:
    """The 8-bit RGB image of ``image``, whatever its mode (the rules are in the module's docstring).

    Args:
        image: A ``PIL.Image.Image``.
        background: The colour transparent pixels are composited on.
        where: Where the image comes from (a file, a row), for error messages.

    Returns:
        A ``PIL.Image.Image`` of mode ``RGB`` (``image`` itself when it already is one).

    Raises:
        ImageLoadError: A mode, or values, with no faithful 8-bit RGB image (e.g. a float image with negative
            values); the message names the mode.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ImageLoadError(f"Expected a PIL image{_describe(where)}, got {type(image).__name__}.")
    mode = image.mode
    if 0 in image.size:
        raise ImageLoadError(f"Image{_describe(where)} is empty ({image.size[0]}x{image.size[1]} pixels).")
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        return _integer_to_rgb(image, where)
    if mode == "F":
        return _float_to_rgb(image, where)
    if mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        return _composite(image, background)
    if mode == "LAB":
        return _lab_to_rgb(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageLoadError(
            f"Image of mode {mode!r}{_describe(where)} cannot be converted to RGB ({err}). Convert it to 'RGB' or "
            "'L' first."
        ) from err
