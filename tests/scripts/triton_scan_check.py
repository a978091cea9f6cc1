"""Compare the Triton scan with the reference loop, forward and backward; exits 1 on a mismatch.

Run with TRITON_INTERPRET=1 on CPU (tests/test_scan_triton.py does) or as is on a GPU:
    python tests/scripts/triton_scan_check.py [--device cuda] [--cases small|gpu]
"""
import argparse
import sys

import torch

from tokenprune.ssm import scan_impl_report, selective_scan

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# (batch, E, N, L, optional inputs, softplus, inputs that need a grad)
SMALL = [
    (2, 37, 5, 70, "all", True, NAMES),        # E not a multiple of the channel block, N not a power of 2
    (1, 8, 4, 1, "all", True, NAMES),          # one step
    (2, 40, 4, 64, "none", False, NAMES[:5]),  # L an exact number of chunks, no optionals
    (1, 33, 3, 33, "D_only", True, ("u", "C")),  # one step into a second chunk; some inputs frozen
]
GPU = [
    (2, 37, 5, 70, "all", True, NAMES),
    (8, 384, 16, 197, "all", True, NAMES),     # ViM-T
    (4, 768, 16, 197, "all", True, NAMES),     # ViM-S
    (1, 64, 16, 1100, "all", True, NAMES),     # long sequence
    (3, 128, 16, 50, "none", False, NAMES[:5]),
]


def make(b, E, N, L, optional, softplus, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(b * 1000 + L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    xs = dict(u=r(b, E, L), delta=r(b, E, L) if softplus else 0.5 * torch.rand(b, E, L, generator=g, dtype=dtype),
              A=-torch.exp(r(E, N)), B=r(b, N, L), C=r(b, N, L), D=r(E), z=r(b, E, L),
              delta_bias=r(E) if softplus else 0.1 * torch.rand(E, generator=g, dtype=dtype))
    drop = {"all": (), "none": ("D", "z", "delta_bias"), "D_only": ("z", "delta_bias")}[optional]
    return {k: (None if k in drop else v.to(device)) for k, v in xs.items()}


def run(impl, xs, softplus, need, gout):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k in need) for k, v in xs.items()}
    out = selective_scan(**leaves, delta_softplus=softplus, impl=impl)
    out.backward(gout.to(out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def _strided(x):
    """The same values as a non-contiguous view (every other element of a wider tensor along the last dim)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2] if x.dim() == 3 else x


def rel_err(a, ref):
    """max |a - ref| / max(1, max |ref|): fp32 sums over L and E carry absolute error at the tensor's scale."""
    return ((a.double() - ref.double()).abs().max() / max(1.0, ref.abs().max().item())).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="small", choices=["small", "gpu"])
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    worst, failed = 0.0, False
    for b, E, N, L, optional, softplus, need in SMALL if args.cases == "small" else GPU:
        # the reference runs in float64: the ground truth; the Triton path computes in float32
        xs64 = make(b, E, N, L, optional, softplus, args.device)
        gout = torch.randn(b, E, L, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(args.device)
        ref_out, ref_grads = run("reference", xs64, softplus, need, gout)
        xs32 = {k: None if v is None else v.float() for k, v in xs64.items()}
        out, grads = run("triton", xs32, softplus, need, gout)
        errs = {"out": rel_err(out, ref_out)}
        for k, g in ref_grads.items():
            if (g is None) != (grads[k] is None):
                print(f"grad of {k}: reference {g is not None}, triton {grads[k] is not None}")
                failed = True
            elif g is not None:
                errs[k] = rel_err(grads[k], g)
        with torch.no_grad():  # inference: the fused kernel, reading strided views (no copies)
            views = {k: None if v is None else _strided(v) for k, v in xs32.items()}
            errs["no_grad"] = rel_err(selective_scan(**views, delta_softplus=softplus, impl="triton"), ref_out)
        case_worst = max(errs.values())
        worst = max(worst, case_worst)
        failed |= case_worst > args.tol
        detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        print(f"b={b} E={E} N={N} L={L} {optional} softplus={softplus}: max rel err {case_worst:.2e} [{detail}]")
    print(f"worst {worst:.2e} (tol {args.tol:g}); impl counts {scan_impl_report()['counts']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
