"""FLOP counting with fvcore (one fused multiply-add = one FLOP, batch 1, everything the model runs).

Handles beyond fvcore's: the selective scan (one `prim::PythonOp.SelectiveScan` node, 9·L·E·N + L·E with D),
fused attention (`aten::scaled_dot_product_attention`: the two matmuls) and bicubic resizing (PaPr).
fvcore only warns about ops it has no handle for; here an op that is not known to be free by the
convention (elementwise, shape and indexing ops) raises, so no costly op is silently skipped.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from .ssm.scan import scan_flops  # the formula (9·L·E·N + L·E with D), defined once beside the scan

# Free by convention: elementwise math, reductions over tokens, shape, indexing and sorting ops.
FREE_OPS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "exp", "log", "log_", "pow", "sqrt",
    "rsqrt", "softplus", "silu", "silu_", "gelu", "sigmoid", "tanh", "relu", "relu6", "hardtanh", "hardtanh_",
    "hardswish", "hardsigmoid", "softmax", "log_softmax", "mean", "sum", "norm", "linalg_vector_norm", "abs",
    "clamp_min", "clamp_max", "maximum", "minimum", "where", "lt", "le", "ne", "logical_not", "logical_and",
    "view", "transpose", "flip", "split", "split_with_sizes", "unbind", "unsqueeze", "squeeze", "select",
    "slice", "to", "type_as", "stack", "repeat", "expand_as", "sort", "argsort", "topk", "cumsum", "cummax",
    "cummin", "scatter", "scatter_", "index_select", "rand", "zeros", "zeros_like", "ones_like", "t",
    "numpy_T", "mT", "lift_fresh", "alias", "clone", "masked_fill_", "fill_", "sign", "argmax", "amax",
    "unflatten", "movedim", "diff", "max_pool2d", "avg_pool2d", "pad", "reciprocal", "erf", "square",
    "scaled_dot_product_attention_math", "expm1", "log1p", "is_nonzero", "__or__", "bitwise_or", "repeat_interleave",
    "scatter_reduce", "scatter_add", "scatter_add_", "index_add", "bitwise_and", "any", "all", "min", "empty_like",
}


def scan_flop_handle(inputs, outputs):
    """SelectiveScan(u, delta, A, B, C, [D], [z], [delta_bias]) -> batch · (9·L·E·N + L·E if D).

    fvcore passes only the tensor inputs; D is the only 1-D one (delta_bias is given as (E, 1))."""
    shapes = [get_shape(v) for v in inputs]
    u, A = shapes[0], shapes[2]
    b, e, length = u
    n = A[1]
    has_d = any(s is not None and len(s) == 1 for s in shapes[5:])
    return b * scan_flops(length, e, n, with_D=has_d)


def sdpa_flop_handle(inputs, outputs):
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch = math.prod(q[:-2])
    return 2 * batch * q[-2] * k[-2] * q[-1]  # q @ k^T and attn @ v


def matmul_flop_handle(inputs, outputs):
    """Batched matmul with broadcasting: output elements × contraction length (fvcore's own handle drops
    the batch of the second operand when the first is a plain matrix, as in W @ x)."""
    return math.prod(get_shape(outputs[0])) * get_shape(inputs[0])[-1]


def bicubic_flop_handle(inputs, outputs):
    return 16 * math.prod(get_shape(outputs[0]))  # 4x4 taps per output element


def bilinear_aa_flop_handle(inputs, outputs):
    """Antialiased bilinear resize: a triangle filter widened by the downscale factor, ceil(2 * in / out)
    taps per axis (at least 2), one multiply-add per tap and output element."""
    src, out = get_shape(inputs[0]), get_shape(outputs[0])
    taps = [max(2, math.ceil(2 * i / o)) for i, o in zip(src[-2:], out[-2:])]
    return taps[0] * taps[1] * math.prod(out)


HANDLES = {
    "aten::_upsample_bilinear2d_aa": bilinear_aa_flop_handle,
    "prim::PythonOp.SelectiveScan": scan_flop_handle,
    "aten::scaled_dot_product_attention": sdpa_flop_handle,
    "aten::upsample_bicubic2d": bicubic_flop_handle,
    "aten::matmul": matmul_flop_handle,
}


class UncountedOpError(RuntimeError):
    """The model runs an op that costs FLOPs but has no counting handle."""


@dataclass
class FlopReport:
    total: int  # every op the model runs (both scan directions, the proposal network, reducers)
    by_operator: Dict[str, int]
    by_module: Dict[str, int]
    paper: Optional[int] = None  # ViM paper convention: linear layers once, one scan direction
    ignored: Dict[str, int] = field(default_factory=dict)  # free-by-convention ops seen (op -> count)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @property
    def paper_gflops(self) -> Optional[float]:
        return None if self.paper is None else self.paper / 1e9


def _op_base(name: str) -> str:
    return name.split("::", 1)[-1]


def count_flops(model: torch.nn.Module, input_size: Optional[Sequence[int]] = None,
                images: Optional[torch.Tensor] = None, strict: bool = True) -> FlopReport:
    """Count FLOPs of one forward at batch 1 (input_size = (C, H, W), default from the model's grid)."""
    if images is None:
        images = torch.randn(1, *(input_size or default_input_size(model)))
    from .ssm import scan_impl  # the fast path is the one op fvcore sees as a single node

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), scan_impl("cpu"):
            analysis = FlopCountAnalysis(model, (images,))
            analysis.set_op_handle(**HANDLES)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = analysis.total()
            unsupported = Counter(analysis.unsupported_ops())
            by_module = analysis.by_module()
    finally:
        model.train(was_training)
    costly = {op: n for op, n in unsupported.items() if _op_base(op) not in FREE_OPS}
    if costly and strict:
        raise UncountedOpError(f"ops with no FLOP handle that are not free by convention: {dict(costly)}; add "
                               "a handle in tokenprune.flops.HANDLES or FREE_OPS (if it costs no FLOPs)")
    backward_dirs = sum(v for k, v in by_module.items() if k.endswith("scan_bwd"))
    paper = total - backward_dirs if backward_dirs else total
    return FlopReport(total=total, by_operator=dict(analysis.by_operator()), by_module=dict(by_module),
                      paper=paper, ignored=dict(unsupported))


def default_input_size(model: torch.nn.Module):
    for mod in model.modules():
        if isinstance(getattr(mod, "input_size", None), (tuple, list)):
            return tuple(mod.input_size)
        pe = getattr(mod, "patch_embed", None)
        if pe is not None and hasattr(pe, "img_size"):
            h, w = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
            return (pe.proj.in_channels, h, w)
    raise ValueError("cannot infer the input size of this model; pass input_size=(C, H, W)")
