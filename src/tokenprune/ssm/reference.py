"""Ground-truth selective scan: a plain per-step PyTorch loop, autograd by PyTorch.

Deliberately simple (it is what the fast paths are tested against): a plain
per-step loop. The sequence is split with one ``unbind`` before the loop,
because indexing ``x[..., t]`` inside the loop makes the backward O(L^2) (every
index op's backward writes a full-size zero tensor).
"""
import torch
import torch.nn.functional as F


def compute_dtype(dtype):
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False):
    """Same arguments and semantics as mamba-ssm's ``selective_scan_fn``.

    u, delta, z: (batch, E, L); A: (E, N), already negative; B, C: (batch, N, L);
    D, delta_bias: (E,). Returns (batch, E, L) in u's dtype.
    """
    out_dtype = u.dtype
    cdt = compute_dtype(u.dtype)
    u = u.to(cdt)
    delta = delta.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]  # bias inside the softplus
    if delta_softplus:
        delta = F.softplus(delta)
    A, B, C = A.to(cdt), B.to(cdt), C.to(cdt)
    # Precompute every step's decay and input in one vectorised op each: (b, E, L, N).
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(2)):
        h = a_t * h + x_t
        ys.append((h * c_t.unsqueeze(1)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(out_dtype)
