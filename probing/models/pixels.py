"""An image processor split in two: resizing on the host (uint8), rescaling and normalising on the device.

The processor's own output is float32, four times the bytes of the resized uint8 image, and its rescale and
normalise steps cost the host more than the resize (measured 0.8 of 2.7 ms per image). After resizing and
cropping, those steps map each channel's value 0..255 to one float on its own, so a table of 3 x 256 floats
made by the processor itself gives the same pixels bit for bit: `table[channel, value]`, looked up where the
pixels are used.

The split is used only when it is exact: the table is built by the processor, then the whole processor and
the split are compared on a test image; a processor that pads, resizes in floating point or refuses the
options keeps its own full path (`host_pixels` then returns its float32 output).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from probing.core.device_copies import to_device

log = logging.getLogger(__name__)

_RESIZE_ONLY = {"do_rescale": False, "do_normalize": False}


class PixelPipeline:
    def __init__(self, image_processor: Any):
        self.image_processor = image_processor
        self.lookup = _lookup_table(image_processor)  # [C, 256] float32, or None: the processor's own path

    def host_pixels(self, image) -> torch.Tensor:
        """One decoded RGB image -> `[C, H, W]`: uint8 when the split is exact, else the processor's float32."""
        if self.lookup is None:
            return _processed(self.image_processor, image)
        return _resized(self.image_processor, image)

    def device_pixels(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host_pixels` output (stacked) -> the processor's float32 pixel values, on `device`."""
        pixels = to_device(pixels, device)
        if pixels.dtype != torch.uint8:
            return pixels
        return _looked_up(to_device(self.lookup, device), pixels)


def _processed(image_processor: Any, image) -> torch.Tensor:
    return torch.as_tensor(image_processor(images=[image], return_tensors="np")["pixel_values"][0])


def _resized(image_processor: Any, image) -> torch.Tensor:
    return torch.as_tensor(image_processor(images=[image], return_tensors="np", **_RESIZE_ONLY)["pixel_values"][0])


def _looked_up(lookup: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> `lookup[channel, value]` for every pixel (float32, on the pixels' device)."""
    channels = pixels.shape[1]
    offsets = torch.arange(channels, device=pixels.device).view(1, channels, 1, 1) * 256
    return lookup.view(-1)[pixels.long() + offsets]


def _lookup_table(image_processor: Any) -> torch.Tensor | None:
    # Resamplers are built under a meta-device context (weights arrive later): the table is real data.
    with torch.device("cpu"):
        return _checked_lookup_table(image_processor)


def _checked_lookup_table(image_processor: Any) -> torch.Tensor | None:
    from PIL import Image

    name = type(image_processor).__name__
    if getattr(image_processor, "do_pad", False):  # padding comes after normalising: not a per-value map
        log.info("%s pads images: pixels are normalised on the host", name)
        return None
    try:
        values = np.arange(256, dtype=np.uint8)
        ramp = Image.fromarray(np.repeat(values[None, :, None], 3, axis=2))  # 1 x 256, every value in each channel
        table = image_processor(images=[ramp], do_resize=False, do_center_crop=False, return_tensors="np")[
            "pixel_values"
        ][0]
        table = torch.as_tensor(table, dtype=torch.float32).reshape(3, 256)
        test = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8))
        resized = _resized(image_processor, test)
        exact = resized.dtype == torch.uint8 and torch.equal(
            _looked_up(table, resized[None])[0], _processed(image_processor, test)
        )
    except (TypeError, ValueError, KeyError, RuntimeError) as error:  # a processor that does not take these options
        log.info("%s: pixels are normalised on the host (%s)", name, error)
        return None
    if not exact:
        log.info("%s: resize-then-table differs from the processor; pixels are normalised on the host", name)
        return None
    return table
