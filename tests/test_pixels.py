"""Pixels resized on the host (uint8) and normalised on the device: bit for bit the image processor's."""

import logging

import numpy as np
import torch
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from probing.data.images import load_rgb_image
from probing.models import load_resampler
from probing.models.pixels import PixelPipeline
from probing.tasks import load_split


def odd_images():
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        for shape in ((97, 131, 3), (480, 640, 3), (300, 20, 3))
    ]


def test_uint8_then_lookup_equals_the_processor(tiny_checkpoints, refcocog_val):
    resampler = load_resampler(str(tiny_checkpoints["blip2"]))
    pipeline = resampler.pixels
    assert pipeline.lookup is not None and pipeline.lookup.shape == (3, 256)
    photos = [load_rgb_image(e.image_path) for e in load_split(refcocog_val, "val").examples[:4]]
    for image in photos + odd_images():
        host = pipeline.host_pixels(image)
        assert host.dtype == torch.uint8  # a quarter of the processor's bytes cross to the device
        processed = resampler.preprocess([image])
        assert torch.equal(pipeline.device_pixels(host[None], torch.device("cpu")), processed)
    batch = torch.stack([pipeline.host_pixels(image) for image in photos])
    with torch.no_grad():
        assert torch.equal(resampler.encode_images(batch), resampler.encode_images(resampler.preprocess(photos)))


def test_a_processor_that_is_not_a_per_value_map_keeps_its_own_path(caplog):
    class PositionDependent(BlipImageProcessorPil):  # normalises with a term that depends on the pixel's place
        def normalize(self, image, mean, std, **kwargs):
            return super().normalize(image, mean, std, **kwargs) + np.linspace(
                0, 1e-3, image.shape[-1], dtype=np.float32
            )

    size = {"height": 32, "width": 32}
    for processor in (PositionDependent(size=size), BlipImageProcessorPil(size=size, do_pad=True)):
        with caplog.at_level(logging.INFO, logger="probing.models.pixels"):
            pipeline = PixelPipeline(processor)
        assert pipeline.lookup is None
        assert "normalised on the host" in caplog.text
        image = odd_images()[0]
        host = pipeline.host_pixels(image)
        assert host.dtype == torch.float32
        expected = torch.as_tensor(processor(images=[image], return_tensors="np")["pixel_values"])
        assert torch.equal(pipeline.device_pixels(host[None], torch.device("cpu")), expected)
        caplog.clear()
