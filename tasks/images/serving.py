"""The images task's edge adapter: an image of any mode and size, converted to the federation's mode and
preprocessed by `standardise`, the function that built the training tensors."""

from __future__ import annotations

from functools import partial

from tasks.features import get_backbone
from tasks.features.cache import to_inputs
from tasks.images import CHANNELS, ImagesSpec, standardise
from tasks.serving import ImageServing


def images_serving(spec: ImagesSpec) -> ImageServing:
    modes = {channels: mode for mode, channels in CHANNELS.items()}
    if spec.channels not in modes:
        raise ValueError(f"the spec has {spec.channels} channel(s); images serve {', '.join(map(str, modes))}")
    # Training images were exactly the manifest's mode and size; requests are converted and resized instead of
    # refused, since resizing is what standardise does to every training image too.
    backbone = get_backbone(spec.model)
    resize = partial(standardise, size=spec.image_size) if backbone is None else partial(to_inputs, size=backbone.input_size)
    return ImageServing(mode=modes[spec.channels], classes=spec.classes, to_inputs=resize)
