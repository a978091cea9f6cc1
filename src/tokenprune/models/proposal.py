"""Proposal ConvNets for PaPr: any timm ConvNet (MobileNetV2 / MobileOne on ImageNet) or the small one below.

PaPr reads the channel mean of the last feature map; the network is trained as an ordinary classifier.
"""
from __future__ import annotations

from typing import Optional, Union

import timm
import torch
from timm.models import register_model
from torch import nn

from .vim_registry import build_with_checkpoint


def _inverted_residual(c_in: int, c_out: int, stride: int, expand: int = 4) -> nn.Module:
    hidden = c_in * expand
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
        nn.ReLU6(inplace=True), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class ProposalConvNet(nn.Module):
    """MobileNetV2-style ConvNet with output stride 8, so a 56x56 image gives a 7x7 score map.

    Like MobileNetV2, the features end in a 1x1 conv + BN + ReLU6 ("conv_head"): PaPr reads the channel mean
    of the last feature map as objectness, which needs non-negative activations; the linear bottleneck
    before it gives a signed mean that ranked background above the object (measured: PaPr below random).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths=(16, 24, 48, 64), head_width: int = 128,
                 **_ignored):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0),
                                  nn.ReLU6(inplace=True))
        self.stages = nn.Sequential(_inverted_residual(w0, w1, 2), _inverted_residual(w1, w2, 2),
                                    _inverted_residual(w2, w2, 1), _inverted_residual(w2, w3, 1))
        self.conv_head = nn.Sequential(nn.Conv2d(w3, head_width, 1, bias=False), nn.BatchNorm2d(head_width),
                                       nn.ReLU6(inplace=True))
        self.num_classes = num_classes
        self.head = nn.Linear(head_width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((2, 3)))


@register_model
def papr_convnet_micro(pretrained=False, **kwargs):
    return build_with_checkpoint(ProposalConvNet, None, {}, pretrained=pretrained, **kwargs)


def build_proposal(proposal: Union[str, nn.Module, None], checkpoint: Optional[str] = None) -> Optional[nn.Module]:
    """A frozen proposal network from a timm name (+ local weights file) or a module."""
    if proposal is None or isinstance(proposal, nn.Module):
        return proposal
    kwargs = {"checkpoint_file": checkpoint} if proposal in ("papr_convnet_micro",) else {}
    model = timm.create_model(proposal, **kwargs)
    if checkpoint and not kwargs:
        from .checkpoint import load_checkpoint_file
        load_checkpoint_file(model, checkpoint)
    return model.eval()
