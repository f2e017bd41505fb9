"""MFNet-3D, the multi-fiber network of Chen et al. (ECCV 2018), with the authors' state_dict layout.

Parameter names and shapes match the released Kinetics-400 checkpoint
(`MFNet3D_Kinetics-400_72.8.pth`, 421 keys; see tests). The architecture:

  conv1  Conv3d 3->16 (3x5x5, stride 1x2x2) + BN + ReLU, then MaxPool (1x3x3, stride 1x2x2)
  conv2..conv5: 3, 4, 6, 3 multi-fiber units, widths 96, 192, 384, 768, 16 fibers (groups);
         conv2's first unit halves time (stride 2x1x1), conv3..5's first units halve space.
  tail   BN + ReLU;  then global average pooling and the 400-way classifier.

A multi-fiber unit is pre-activation (BN -> ReLU -> Conv): a 1x1x1 multiplexer (conv_i1, conv_i2)
adds a cross-fiber mix to the input, then two grouped convolutions (conv_m1 3x3x3, conv_m2 1x3x3;
1x1x1 ungrouped in a stage's first unit) form the fibers, and a shortcut (conv_w1 when the shape
changes) is added. For a (B, 3, 16, 112, 112) clip the tail gives (B, 768, 8, 4, 4).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MissingFile, PipelineError

LAYERS = ("tail", "conv5")  # where forward_features may stop


class WeightsError(PipelineError, ValueError):
    """A weights file that cannot be read or does not fit MFNet3D."""


class BnReluConv(nn.Sequential):
    def __init__(self, c_in, c_out, kernel=(1, 1, 1), stride=(1, 1, 1), groups=1):
        pad = tuple(k // 2 for k in kernel)
        super().__init__(OrderedDict(
            bn=nn.BatchNorm3d(c_in),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv3d(c_in, c_out, kernel, stride, pad, groups=groups, bias=False),
        ))


class MultiFiberUnit(nn.Module):
    def __init__(self, c_in, c_mid, c_out, stride=(1, 1, 1), groups=16, first=False):
        super().__init__()
        c_mux = c_mid // 4
        self.conv_i1 = BnReluConv(c_in, c_mux)
        self.conv_i2 = BnReluConv(c_mux, c_in)
        self.conv_m1 = BnReluConv(c_in, c_mid, (3, 3, 3), stride, groups)
        self.conv_m2 = BnReluConv(c_mid, c_out) if first else BnReluConv(c_mid, c_out, (1, 3, 3), groups=groups)
        if first:
            self.conv_w1 = BnReluConv(c_in, c_out, stride=stride)

    def forward(self, x):
        h = x + self.conv_i2(self.conv_i1(x))
        h = self.conv_m2(self.conv_m1(h))
        shortcut = self.conv_w1(x) if hasattr(self, "conv_w1") else x
        return h + shortcut


def _stage(c_in, width, units, stride):
    return nn.Sequential(OrderedDict(
        (f"B{i:02d}", MultiFiberUnit(c_in if i == 1 else width, width, width, stride if i == 1 else (1, 1, 1),
                                     first=(i == 1)))
        for i in range(1, units + 1)))


class MFNet3D(nn.Module):
    feature_dim = 768

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.conv1 = nn.Sequential(OrderedDict(
            conv=nn.Conv3d(3, 16, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False),
            bn=nn.BatchNorm3d(16),
            relu=nn.ReLU(inplace=True),
        ))
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.conv2 = _stage(16, 96, 3, (2, 1, 1))
        self.conv3 = _stage(96, 192, 4, (1, 2, 2))
        self.conv4 = _stage(192, 384, 6, (1, 2, 2))
        self.conv5 = _stage(384, 768, 3, (1, 2, 2))
        self.tail = nn.Sequential(OrderedDict(bn=nn.BatchNorm3d(768), relu=nn.ReLU(inplace=True)))
        # The authors pool with a fixed 8x7x7 kernel (224x224 input only); adaptive works at any size.
        self.globalpool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(768, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x, layer: str = "tail"):
        """(B, 3, F, H, W) -> (B, 768, F/2, H/32, W/32) taken after `tail` (BN+ReLU) or `conv5`."""
        if layer not in LAYERS:
            raise ConfigError(f"layer must be one of {LAYERS}, got {layer!r}")
        h = self.maxpool(self.conv1(x))
        h = self.conv5(self.conv4(self.conv3(self.conv2(h))))
        return self.tail(h) if layer == "tail" else h

    def forward(self, x):
        return self.classifier(self.globalpool(self.forward_features(x)).flatten(1))

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu") -> "MFNet3D":
        """Load the authors' released file, a bare state dict, or one of our checkpoints; strictly."""
        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"MFNet weights {path}: file does not exist")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # pickle or zip errors: say which file
            raise WeightsError(f"MFNet weights {path}: cannot be read by torch.load ({e})") from e
        state = obj.get("state_dict", obj.get("backbone", obj)) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise WeightsError(f"MFNet weights {path}: expected a state dict or a dict with 'state_dict'")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 400
        model = cls(num_classes)
        check_state_dict(model, state, path)
        own = model.state_dict()
        # Saved under PyTorch 0.4, the release has no num_batches_tracked buffers; they are unused in eval.
        for k in own:
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = own[k]
        model.load_state_dict(state, strict=True)
        return model


def check_state_dict(model: nn.Module, state: dict, source) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"MFNet weights {source} do not match MFNet3D:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {len(items)} {title}: " + "; ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise WeightsError("\n".join(lines))


def random_mfnet(seed: int = 0) -> MFNet3D:
    """A seeded random network for demos and tests (no pretrained weights exist here)."""
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        return MFNet3D()

