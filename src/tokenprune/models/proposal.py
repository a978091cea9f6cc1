"""Proposal ConvNets for PaPr: any timm ConvNet (MobileNetV2 / MobileOne on ImageNet) or the small one below.

PaPr reads the channel mean of the last feature map; the network is trained as an ordinary classifier.
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import timm
import torch
from timm.models import register_model
from torch import nn

from .registry import build_with_checkpoint


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


# Conv -> BN pairs inside timm's MobileNet/EfficientNet blocks (attribute names as timm registers them);
# consecutive (Conv2d, BatchNorm2d) children of an nn.Sequential are folded too. Anything else stays as is.
FOLD_PAIRS = {
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "ConvBnAct": (("conv", "bn1"),),
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "MobileNetV3": (("conv_stem", "bn1"),),
}


def _foldable(conv, bn) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode BN as one conv: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)
    # made where the weights are, uninitialised (no CPU tensors, no random init: both are overwritten)
    fused = torch.nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, conv.dilation, conv.groups, bias=True,
                                     padding_mode=conv.padding_mode, device=conv.weight.device,
                                     dtype=conv.weight.dtype)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def _after_bn(bn: nn.Module) -> nn.Module:
    """What is left of a folded BN: timm's BatchNormAct2d keeps its dropout and activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode ConvNet with every known conv -> BN pair folded into one conv (inference only:
    the running statistics become constants). Same outputs to float rounding (tested on MobileNetV2 and the
    micro proposal), fewer kernels."""
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        pairs = list(FOLD_PAIRS.get(type(parent).__name__, ()))
        if isinstance(parent, nn.Sequential):
            names = [n for n, _ in parent.named_children()]
            pairs += list(zip(names[:-1], names[1:]))
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if _foldable(conv, bn):
                setattr(parent, conv_name, _fold(conv, bn))
                setattr(parent, bn_name, _after_bn(bn))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
