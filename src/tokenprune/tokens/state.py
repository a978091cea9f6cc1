"""The token state carried through a backbone's blocks.

Every per-token tensor shares the leading (batch, tokens) dims, and the token count is the same for every
image of the batch (budgets are fixed counts), so reductions stay rectangular gathers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import torch

PER_TOKEN_FIELDS = ("x", "residual", "pos", "size", "protected")


@dataclass
class TokenState:
    x: torch.Tensor  # (B, T, D) hidden states
    pos: torch.Tensor  # (B, T) long: original sequence index, -1 for tokens that are no original token
    size: torch.Tensor  # (B, T) float: original patches each token stands for
    protected: torch.Tensor  # (B, T) bool: never dropped or merged (CLS, registers)
    grid: Tuple[int, int]  # (H, W) patch grid
    seq_to_grid: torch.Tensor = None  # (seq_len,) long lookup: sequence index -> grid index (-1 for non-patch)
    residual: Optional[torch.Tensor] = None  # (B, T, D) fp32 residual stream (ViM)
    cls_index: Optional[int] = None  # where the CLS sits in the current sequence
    seq_len: int = 0  # length of the original sequence (for gap counts)
    n_protected: int = 0  # protected tokens per row: a python int, so budgets never read the device
    # per-call data: "reduced" / "merged" (a stage ran / sizes may differ from 1), alignment, PlainMamba orders
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[1])  # a python int also under jit tracing (FLOP counting)

    @property
    def batch_size(self) -> int:
        return int(self.x.shape[0])

    def patch_index(self) -> torch.Tensor:
        """Grid index (0..H*W-1) of each token; -1 for CLS, registers and fused extra tokens."""
        safe = self.pos.clamp(min=0)
        idx = self.seq_to_grid[safe]
        return torch.where(self.pos >= 0, idx, torch.full_like(idx, -1))

    def gather(self, idx: torch.Tensor, cls_index: Optional[int] = None) -> "TokenState":
        """Keep the tokens at `idx` (B, T') in that order; every per-token field follows."""
        out = {}
        for name in PER_TOKEN_FIELDS:
            value = getattr(self, name)
            if value is None:
                out[name] = None
            elif value.dim() == 3:
                out[name] = value.gather(1, idx.unsqueeze(-1).expand(-1, -1, value.shape[-1]))
            else:
                out[name] = value.gather(1, idx)
        return replace(self, cls_index=cls_index, **out)

    def with_tokens(self, **fields) -> "TokenState":
        return replace(self, **fields)

    def scatter_to_grid(self, tokens: torch.Tensor, fill_value: float = 0.0) -> torch.Tensor:
        """(B, T, C) per-token values -> (B, H*W, C) on the patch grid: each patch token at its original
        position, every position without a token (pruned, or merged into another token) = fill_value;
        tokens with no grid position (CLS, registers, EViT's fused token) are left out."""
        B, T, C = tokens.shape
        n = self.grid[0] * self.grid[1]
        idx = self.patch_index()
        slot = torch.where(idx >= 0, idx, torch.full_like(idx, n))  # one spare slot takes the non-patch tokens
        out = tokens.new_full((B, n + 1, C), fill_value)
        out.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, C), tokens)
        return out[:, :n]

    def insert_middle_cls(self) -> Tuple["TokenState", int]:
        """Re-place the protected CLS in the middle of the sequence (ViM): K patches -> CLS at K // 2.

        Assumes the CLS is currently anywhere and the other tokens are in scan order.
        """
        if self.cls_index is None:
            return self, None
        B, T = (int(s) for s in self.pos.shape)  # python ints also under jit tracing
        idx = middle_cls_permutation(T, self.cls_index, self.x.device)
        return self.gather(idx.unsqueeze(0).expand(B, -1), cls_index=(T - 1) // 2), (T - 1) // 2


def middle_cls_permutation(T: int, c: int, device) -> torch.Tensor:
    """(T,) index that moves the token at `c` to the middle, (T - 1) // 2, keeping the others in order (built
    once per (T, c, device): arithmetic on an arange, no host list)."""
    middle = (T - 1) // 2

    def build(dev):
        j = torch.arange(T, device=dev)
        other = j - (j > middle).long()  # rank among the non-CLS tokens
        other = other + (other >= c).long()  # skip the CLS
        return torch.where(j == middle, torch.full_like(j, c), other)
    return static_index(("middle_cls", T, c), device, build)


_STATIC: dict = {}  # (what, sizes..., device) -> index tensor that depends only on python ints


def static_index(key: tuple, device, build) -> torch.Tensor:
    """An index tensor that depends only on python ints, built once per device (then no launch per forward).

    Not cached while a CUDA graph is being captured (the kernels that fill it would not run until replay)
    or under torch.compile (it traces `build` instead); built outside inference mode so that training can
    use it after an inference_mode measurement."""
    device = torch.device(device)
    # is_compiling first: Dynamo cannot trace the capture query (a graph break, an error under fullgraph)
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return build(device)
    k = key + (str(device),)
    t = _STATIC.get(k)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():
            t = build(device)
        if len(_STATIC) < 256:
            _STATIC[k] = t
    return t


def _special_mask(j: torch.Tensor, special: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros_like(j, dtype=torch.bool)
    for s in sorted(set(int(v) for v in special)):  # a handful (CLS, registers): one compare each
        mask = mask | (j == s)
    return mask


def seq_to_grid_lookup(seq_len: int, special: Sequence[int], device=None) -> torch.Tensor:
    """Map sequence index -> grid index when the non-patch tokens sit at the sequence indices `special`.

    Built on `device` from an arange (no CPU tensor copied per forward)."""
    j = torch.arange(seq_len, device=device)
    before = torch.zeros_like(j)
    for s in sorted(set(int(v) for v in special)):
        before = before + (j > s).long()  # special tokens before j
    return torch.where(_special_mask(j, special), torch.full_like(j, -1), j - before)


def initial_state(x: torch.Tensor, grid: Tuple[int, int], special: Sequence[int] = (),
                  cls_at: Optional[int] = None, residual: Optional[torch.Tensor] = None) -> TokenState:
    """State for an unpruned sequence; `special` are the protected non-patch positions (CLS, registers)."""
    B, T, _ = x.shape
    if T - len(special) != grid[0] * grid[1]:
        raise ValueError(f"sequence of {T} tokens with {len(special)} special ones does not fit grid {grid}")
    special = tuple(sorted(set(int(v) for v in special)))
    pos = static_index(("arange", T), x.device, lambda d: torch.arange(T, device=d)).unsqueeze(0).expand(B, -1)
    protected = static_index(("special", T, special), x.device,
                             lambda d: _special_mask(torch.arange(T, device=d), special)).unsqueeze(0).expand(B, -1)
    size = torch.ones(B, T, device=x.device, dtype=torch.float32)
    lookup = static_index(("seq_to_grid", T, special), x.device, lambda d: seq_to_grid_lookup(T, special, d))
    return TokenState(x=x, pos=pos, size=size, protected=protected, grid=grid,
                      seq_to_grid=lookup, residual=residual,
                      cls_index=cls_at, seq_len=T, n_protected=len(set(int(v) for v in special)))
