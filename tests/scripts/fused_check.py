"""The fused Triton scan, conv and add + RMSNorm ops (``tokenprune.ssm.fused_ops``) against float64 references, forward and
backward, every optional input; exits 1 on a mismatch.

Run with TRITON_INTERPRET=1 on CPU (tests/test_fused_ops.py does) or as is on a GPU:
    python tests/scripts/fused_check.py [--device cuda] [--cases small|gpu]
The reference for direction 1 is the causal scan / conv of the flipped sequence, flipped back (what ViM
computes with flips); gap-aware decay is checked against its standard-kernel form (Δ·s, B / s).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from tokenprune.ssm.fused_norm import add_rms_norm
from tokenprune.ssm.fused_ops import conv1d_silu, fused_selective_scan
from tokenprune.ssm.reference import selective_scan_reference

# (ndir, batch, E, N, L, optionals, layout, dtype)
SMALL = [
    (2, 2, 6, 3, 37, "all", "bel", torch.float32),      # both directions, gaps, N not a power of 2
    (1, 1, 5, 4, 1, "all", "bel", torch.float32),       # one step
    (2, 2, 7, 2, 70, "none", "ebl", torch.float32),     # > 1 chunk, channel-major layout, no optionals
    (1, 2, 33, 3, 20, "z_only", "bel", torch.float32),  # E over one channel block
    (2, 1, 6, 4, 29, "all", "ebl", torch.bfloat16),     # bf16 inputs and output
    (2, 1, 5, 2, 32, "all", "bel", torch.float32),      # L a multiple of both kernels' chunks: no partial chunk
    # scan orders by index (PlainMamba: four zig-zags in one launch), u / dt / C shared by the directions as
    # stride-0 expansions (their gradients summed by autograd), the sum of the directions (scale 1)
    (4, 2, 6, 3, 37, "all+idx", "bel", torch.float32),
    (3, 1, 5, 2, 20, "gap+idx", "ebl", torch.float32),
]
# N = 16 as in every real model (N is a compile-time constant: fewer kernel variants to compile)
GPU = [
    (2, 8, 384, 16, 197, "all", "ebl", torch.float32),   # ViM-T, the mixer's layout
    (2, 4, 768, 16, 197, "all", "ebl", torch.bfloat16),  # ViM-S in bf16
    (1, 2, 256, 16, 1100, "all", "bel", torch.float32),  # one direction, long sequence
    (2, 4, 384, 16, 99, "gap", "ebl", torch.float32),    # pruned (gap-aware) sequence, no gate
    (2, 3, 37, 16, 70, "none", "bel", torch.float32),    # partial channel block and chunk, no optionals
    (4, 2, 448, 16, 196, "all+idx", "bel", torch.float32),  # PlainMamba-L3's four orders by index
    (4, 2, 448, 16, 118, "gap+idx", "bel", torch.bfloat16),  # pruned, gap-aware, bf16
]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / max(1.0, ref.abs().max().item())).item()


def layout(x, kind):
    """(..., b, E, L) values laid out (..., E, b, L) in memory when kind == 'ebl'."""
    if kind == "bel":
        return x.contiguous()
    return x.transpose(-3, -2).contiguous().transpose(-3, -2)


def make(ndir, b, E, N, L, opt, kind, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    by_index = opt.endswith("+idx")
    opt = opt.replace("+idx", "")
    shared = 1 if by_index else ndir  # u, dt and C shared by the directions in the index-ordered cases
    x = dict(u=r(shared, b, E, L), dt=r(shared, b, E, L), A0=0.5 * r(E, N), A1=0.5 * r(E, N),
             B=r(ndir, b, N, L), C=r(shared, b, N, L), D0=r(E), D1=r(E), z=r(b, E, L), bias0=r(E), bias1=r(E),
             gap=1.0 + torch.randint(0, 4, (ndir, b, L), generator=g).float())
    idx = torch.stack([torch.randperm(L, generator=g) for _ in range(ndir * b)]).view(ndir, b, L)
    drop = {"all": (), "none": ("D0", "D1", "z", "bias0", "bias1", "gap"), "z_only": ("D0", "D1", "bias0",
            "bias1", "gap"), "gap": ("z",)}[opt]
    if ndir == 1:
        drop = drop + ("A1", "D1", "bias1")
    out = {}
    for k, v in x.items():
        if k in drop:
            out[k] = None
            continue
        if k in ("u", "dt", "z"):
            v = layout(v.to(dtype), kind)
        elif k in ("B", "C"):
            v = v.to(dtype)
        out[k] = v.to(device)
    out["idx"] = idx.to(device) if by_index else None
    return out


def _expanded(x, name):
    """x[name] with the direction dim expanded to B's (stride 0) when the directions share it."""
    v, ndir = x[name], x["B"].shape[0]
    return v.expand(ndir, *v.shape[1:]) if v.shape[0] != ndir else v


def reference(x):
    """float64: each direction through the reference loop, direction 1 on the flipped sequence; with an index
    table, direction i scans u gathered by idx[i] (Δ, B, C, gap per step) and its output goes back by
    scatter; the directions are averaged, or summed with an index table (PlainMamba)."""
    d = {k: None if v is None else (v if k == "idx" else v.double()) for k, v in x.items()}
    for k in ("u", "dt", "C"):
        d[k] = _expanded(d, k)
    ndir = d["B"].shape[0]
    ys = []
    for i in range(ndir):
        flip = (lambda t: t.flip(-1)) if i == 1 and d["idx"] is None else (lambda t: t)
        j = min(i, 1)  # directions 1.. share (A1, D1, bias1)
        bias = d["bias%d" % j]
        delta = d["dt"][i] + (bias[:, None] if bias is not None else 0)
        delta = F.softplus(delta) if bias is not None else delta.abs()
        s = d["gap"][i][:, None, :] if d["gap"] is not None else torch.ones_like(delta[:, :1])
        u = d["u"][i]
        if d["idx"] is not None:
            index = d["idx"][i][:, None, :].expand_as(u)
            u = u.gather(-1, index)
        y = selective_scan_reference(flip(u), flip(delta * s), -torch.exp(d["A%d" % j]),
                                     flip(d["B"][i] / s), flip(d["C"][i]), d["D%d" % j])
        y = flip(y)
        if d["idx"] is not None:
            y = torch.zeros_like(y).scatter(-1, index, y)
        ys.append(y)
    y = sum(ys) / (ndir if d["idx"] is None else 1)
    return y * F.silu(d["z"]) if d["z"] is not None else y


def ours(x):
    softplus = x["bias0"] is not None
    dt = _expanded(x, "dt")
    dt = dt if softplus else dt.abs()  # without bias/softplus: positive steps, as softplus gives
    return fused_selective_scan(_expanded(x, "u"), dt, x["A0"], x["B"], _expanded(x, "C"), x["D0"], x["z"],
                                x["bias0"], A1=x["A1"], D1=x["D1"], bias1=x["bias1"], gap=x["gap"], idx=x["idx"],
                                softplus=softplus, a_is_log=True, scale=None if x["idx"] is None else 1.0)


def check_scan(case, device, seed):
    ndir, b, E, N, L, opt, kind, dtype = case
    x = make(*case, device, seed)
    fixed = ("gap", "idx")  # no gradient
    leaves = {k: None if v is None or k in fixed else v.detach().clone().requires_grad_() for k, v in x.items()}
    ref_in = {k: None if v is None or k in fixed else v.detach().double().requires_grad_() for k, v in x.items()}
    for k in fixed:
        leaves[k] = ref_in[k] = x[k]
    y = ours(leaves)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    y.backward(gy.to(y.dtype))
    yr = reference(ref_in)
    yr.backward(gy.double())
    errs = {"y": rel_err(y, yr)}
    if y.dtype != x["u"].dtype:
        errs["y_dtype"] = float("inf")
    for k, v in leaves.items():
        if v is not None and k not in fixed:
            errs["d" + k] = rel_err(v.grad, ref_in[k].grad)
    with torch.no_grad():  # inference: no states saved
        errs["no_grad"] = rel_err(ours(x), yr)
    return errs


def check_conv(ndir, b, E, L, kind, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = layout(torch.randn(b, E, L, generator=g).to(dtype), kind).to(device).requires_grad_()
    ws = [torch.randn(E, 1, 4, generator=g).to(device).requires_grad_() for _ in range(2)]
    bs = [torch.randn(E, generator=g).to(device).requires_grad_() for _ in range(2)]
    out = conv1d_silu(x, ws[0], bs[0], ws[1] if ndir == 2 else None, bs[1] if ndir == 2 else None)
    go = torch.randn(out.shape, generator=g).to(device)
    out.backward(go.to(out.dtype))
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in ws]
    b64 = [t.detach().double().requires_grad_() for t in bs]
    ref = [F.silu(F.conv1d(F.pad(x64, (3, 0)), w64[0], b64[0], groups=E))]
    if ndir == 2:
        ref.append(F.silu(F.conv1d(F.pad(x64.flip(-1), (3, 0)), w64[1], b64[1], groups=E)).flip(-1))
    ref = torch.stack(ref)
    ref.backward(go.double())
    errs = {"out": rel_err(out, ref), "dx": rel_err(x.grad, x64.grad)}
    for i in range(ndir):
        errs[f"dw{i}"] = rel_err(ws[i].grad, w64[i].grad)
        errs[f"db{i}"] = rel_err(bs[i].grad, b64[i].grad)
    return errs


# (rows shape, D, with residual, h dtype, out dtype): D not a power of 2, rows not a multiple of the rows per
# program, the first block (no residual), bf16 in / bf16 out as under autocast
NORM = [((2, 13), 24, True, torch.float32, torch.float32), ((3, 5), 40, False, torch.float32, torch.float32),
        ((2, 7), 24, True, torch.bfloat16, torch.bfloat16), ((1, 3), 1000, True, torch.float32, torch.bfloat16)]


def check_norm(shape, D, with_res, dtype, out_dtype, device, seed):
    """add_rms_norm's two outputs and its gradients (h, residual, weight) against float64 torch."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g).to(dtype).to(device).requires_grad_()
    res = (torch.randn(*shape, D, generator=g) * 2).to(device).requires_grad_() if with_res else None
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(device).requires_grad_()
    y, r = add_rms_norm(h, res, w, 1e-5, out_dtype)
    gy, gr = torch.randn(y.shape, generator=g).to(device), torch.randn(r.shape, generator=g).to(device)
    (y.float() * gy).sum().add((r * gr).sum()).backward()
    h64 = h.detach().double().requires_grad_()
    r64 = res.detach().double().requires_grad_() if with_res else None
    w64 = w.detach().double().requires_grad_()
    rr = h64 if r64 is None else h64 + r64
    yy = rr * torch.rsqrt(rr.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    (yy * gy.double()).sum().add((rr * gr.double()).sum()).backward()
    errs = {"y": rel_err(y, yy), "residual": rel_err(r, rr), "dh": rel_err(h.grad, h64.grad),
            "dw": rel_err(w.grad, w64.grad)}
    if with_res:
        errs["dres"] = rel_err(res.grad, r64.grad)
    if y.dtype != out_dtype or r.dtype != torch.float32:
        errs["dtype"] = float("inf")
    return errs


def check_compile(device):
    """torch.compile (fullgraph, aot_eager: fake-tensor tracing through the fake implementations and the
    registered autograd) and torch.export give the eager values and gradients (scan, conv, add + norm)."""
    # what is checked here is the tracing, not the numerics (the cases above): on CPU a small case, as Triton's
    # interpreter runs the scan's loop over states once per state (N = 16 took ~285 s there, N = 4 ~20 s)
    case = (2, 2, 6, 16, 37, "all", "ebl", torch.float32) if device != "cpu" else (2, 1, 6, 4, 13, "all", "ebl",
                                                                                   torch.float32)
    x = make(*case, device, 5)

    def f(u, dt, A0, A1, B, C, z, w0, b0):
        uu = conv1d_silu(u[0], w0, b0, w0, b0)
        y = fused_selective_scan(uu, dt, A0, B, C, x["D0"], z, x["bias0"], A1=A1, D1=x["D1"],
                                 bias1=x["bias1"], gap=x["gap"], softplus=True, a_is_log=True)
        y, r = add_rms_norm(y, z, b0.new_ones(y.shape[-1]) + 0.1 * dt[0, 0, 0])  # the add + norm op too
        return y + r
    w0 = torch.randn(6, 1, 4).to(device)
    b0 = torch.randn(6).to(device)
    names = ("u", "dt", "A0", "A1", "B", "C", "z")
    errs = {}
    results = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [x[k].detach().clone().requires_grad_() for k in names] + [w0.clone().requires_grad_(),
                                                                         b0.clone().requires_grad_()]
        y = fn(*leaves)
        y.square().sum().backward()
        results.append((y.detach(), [t.grad for t in leaves]))
    (y0, g0), (y1, g1) = results
    errs["compiled_y"] = rel_err(y1, y0)
    errs["compiled_grads"] = max(rel_err(a, b) for a, b in zip(g1, g0))

    class M(torch.nn.Module):
        def forward(self, *a):
            return f(*a)
    ep = torch.export.export(M(), tuple(x[k] for k in names) + (w0, b0))
    errs["exported_y"] = rel_err(ep.module()(*(x[k] for k in names), w0, b0), y0)
    return errs


# the scan at other backward tiles (TOKENPRUNE_SCAN_TILE): how many halving steps the dB/dC lane sums take
# depends on T, and BE > 32 puts several 32-channel groups in one program
TILE_CASES = [(2, 2, 70, 3, 37, "all", "bel", torch.float32), (1, 1, 40, 2, 9, "all+idx", "ebl", torch.float32)]


def report(label, errs, tol):
    """Print one check's line; True when its worst error exceeds tol."""
    worst = max(errs.values())
    detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
    print(f"{label}: worst {worst:.2e} (tol {tol:g}) [{detail}]")
    return not worst <= tol


def check_tiles(tiles, device):
    failed = False
    for tile in tiles:
        os.environ["TOKENPRUNE_SCAN_TILE"] = tile
        for i, case in enumerate(TILE_CASES):
            failed |= report(f"scan at tile {tile} {case[:7]}", check_scan(case, device, 60 + i), TOL[case[-1]])
    os.environ.pop("TOKENPRUNE_SCAN_TILE")
    print("FAILED" if failed else "all tile checks passed")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="small", choices=["small", "gpu"])
    ap.add_argument("--tiles", nargs="+", metavar="BE,T,WARPS", help="only the scan, at these backward tiles")
    args = ap.parse_args()
    if args.tiles:
        return check_tiles(args.tiles, args.device)
    failed = False
    for i, case in enumerate(SMALL if args.cases == "small" else GPU):
        tol = TOL[case[-1]]
        checks = [("scan", lambda: check_scan(case, args.device, 10 + i))]
        if not case[5].endswith("+idx"):  # the conv has one or two directions, no index tables
            checks.append(("conv", lambda: check_conv(case[0], case[1], case[2], case[4], case[6], case[7],
                                                      args.device, 20 + i)))
        for what, run in checks:
            failed |= report(f"{what} {case[:7]} {str(case[7]).split('.')[-1]}", run(), tol)
    for i, case in enumerate(NORM if args.cases == "small" else NORM[:2] + [((64, 197), 384, True,
                                                                             torch.bfloat16, torch.bfloat16)]):
        tol = TOL[case[3]] if case[4] == torch.float32 else TOL[torch.bfloat16]
        failed |= report(f"add_rms_norm {case[:3]} {str(case[3]).split('.')[-1]}->{str(case[4]).split('.')[-1]}",
                         check_norm(*case, args.device, 40 + i), tol)
    failed |= report("compile/export", check_compile(args.device), 1e-5)
    print("FAILED" if failed else "all fused-op checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
