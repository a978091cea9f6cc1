"""GPU speed of the SSM path (issue 16), every table from one run, ratios measured in that run.

    python benchmarks/bench_ssm_gpu.py --out benchmarks/gpu_h200/ssm.md [--quick] [--sweep] [--sections a,b]

1. the scan at ViM-S shape (128, 768, 16, 197) vs a device copy of the same bytes (fp32 and bf16 inputs), for
   the public single-direction op and ViM's fused bidirectional op; mamba-ssm's ``selective_scan_fn`` on the
   same inputs when it is installed (time ratio and max abs difference);
2. scan time vs sequence length (batch 64, E 768, L = 197/158/118/99), forward and forward+backward;
3. ViM-S vs DeiT-S images/s (batch 128, fp32 with TF32 matmuls, and bf16 autocast), ViM-S bf16 / fp32;
4. a ViM-S training step (fwd+bwd+AdamW, bf16 autocast, batch 64) vs DeiT-S;
5. kernels launched per ViM-S forward (torch.profiler).
Timing: CUDA events around ``iters`` calls after warm-up, median of ``rounds`` rounds, variants interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header  # noqa: E402

import timm  # noqa: E402

import tokenprune  # noqa: E402,F401
from tokenprune.ssm import scan_impl, selective_scan  # noqa: E402
from tokenprune.ssm.fused_ops import fused_selective_scan  # noqa: E402

DEV = "cuda"
VIM, DEIT, IMG = "vim_small_patch16_224", "deit_small_patch16_224", 224


SMOKE = False  # --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script, not the speed)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fns, iters=20, rounds=5, warmup=3):
    """{name: median seconds per call}, the callables interleaved round by round (CUDA events on a GPU)."""
    if SMOKE:
        iters, rounds, warmup = 1, 1, 0
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if DEV == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(iters):
                    fn()
                b.record()
                torch.cuda.synchronize()
                times[k].append(a.elapsed_time(b) / 1e3 / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[k].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def size(b, E, L):
    """The real shape, or a tiny one for --smoke."""
    return (2, 16, min(L, 21)) if SMOKE else (b, E, L)


def scan_inputs(b, E, N, L, dtype, ndir=1, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV)  # noqa: E731
    return dict(u=r(ndir, b, E, L).to(dtype), dt=r(ndir, b, E, L).to(dtype), A=-torch.exp(r(E, N)),
                A1=-torch.exp(r(E, N)), B=r(ndir, b, N, L).to(dtype), C=r(ndir, b, N, L).to(dtype), D=r(E),
                D1=r(E), z=r(b, E, L).to(dtype), bias=r(E), bias1=r(E))


def scan_bytes(b, E, N, L, elt, ndir=1):
    # u, dt read per direction, z read once, B, C per direction, y written once
    return elt * (ndir * (2 * b * E * L + 2 * b * N * L) + 2 * b * E * L)


def copy_time(nbytes):
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEV)  # read half, write half = nbytes moved
    dst = torch.empty_like(src)
    return bench({"copy": lambda: dst.copy_(src)})["copy"]


def table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def section_scan(lines):
    (b, E, L), N = size(128, 768, 197), 16
    rows = []
    have_mamba = False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        have_mamba = True
    except Exception as exc:  # noqa: BLE001
        lines.append(f"mamba-ssm not importable here: `{type(exc).__name__}: {exc}`\n")
    for dtype in (torch.float32, torch.bfloat16):
        elt = torch.finfo(dtype).bits // 8
        x = scan_inputs(b, E, N, L, dtype, ndir=2)
        one = dict(u=x["u"][0], delta=x["dt"][0], A=x["A"], B=x["B"][0], C=x["C"][0], D=x["D"], z=x["z"],
                   delta_bias=x["bias"], delta_softplus=True)
        fns = {"ours, 1 direction": lambda: selective_scan(**one, impl="triton"),
               "ours, ViM bidirectional (fused)": lambda: fused_selective_scan(
                   x["u"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], A1=x["A1"], D1=x["D1"],
                   bias1=x["bias1"], softplus=True)}
        if have_mamba:
            fns["mamba-ssm selective_scan_fn, 1 direction"] = lambda: selective_scan_fn(**one)
        with torch.no_grad():  # inference: the one-channel-per-thread kernel
            t = bench(fns)
        lv = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        t.update(bench({"ours, ViM bidirectional, training fwd (states saved for the backward)":
                        lambda: fused_selective_scan(lv["u"], lv["dt"], lv["A"], lv["B"], lv["C"], lv["D"], lv["z"],
                                                     lv["bias"], A1=lv["A1"], D1=lv["D1"], bias1=lv["bias1"],
                                                     softplus=True)}))
        c1 = copy_time(scan_bytes(b, E, N, L, elt, 1))
        c2 = copy_time(scan_bytes(b, E, N, L, elt, 2))
        for name, sec in t.items():
            nd = 2 if "bidirectional" in name else 1
            nbytes = scan_bytes(b, E, N, L, elt, nd)
            copy = c2 if nd == 2 else c1
            rows.append({"dtype": str(dtype).split(".")[-1], "op": name, "ms": f"{sec * 1e3:.3f}",
                         "GB/s": f"{nbytes / sec / 1e9:.0f}", "same-bytes copy ms": f"{copy * 1e3:.3f}",
                         "fraction of copy bandwidth": f"{copy / sec:.1%}"})
        if have_mamba:
            with torch.no_grad():
                ours = selective_scan(**one, impl="triton").float()
                theirs = selective_scan_fn(**one).float()
            rows.append({"dtype": str(dtype).split(".")[-1], "op": "ours vs mamba-ssm",
                         "ms": f"time ratio mamba/ours {t['mamba-ssm selective_scan_fn, 1 direction'] / t['ours, 1 direction']:.2f}",
                         "GB/s": f"max abs diff {(ours - theirs).abs().max().item():.2e}"})
    lines.append("### Scan forward at ViM-S shape (batch 128, E 768, N 16, L 197), D, z, bias, softplus\n")
    lines.append(table(rows, ["dtype", "op", "ms", "GB/s", "same-bytes copy ms", "fraction of copy bandwidth"]))
    if have_mamba:  # fwd+bwd side by side
        x = scan_inputs(b, E, N, L, torch.float32)
        one = dict(u=x["u"][0], delta=x["dt"][0], A=x["A"], B=x["B"][0], C=x["C"][0], D=x["D"], z=x["z"],
                   delta_bias=x["bias"])
        leaves = {k: v.clone().requires_grad_() for k, v in one.items()}
        gy = torch.randn_like(x["u"][0])

        def fb(fn):
            def run():
                fn(**leaves, delta_softplus=True).backward(gy)
            return run
        t = bench({"ours": fb(lambda **k: selective_scan(**k, impl="triton")), "mamba-ssm": fb(selective_scan_fn)},
                  iters=10)
        lines.append(f"\nfwd+bwd fp32 at ViM-S shape: ours {t['ours'] * 1e3:.3f} ms, mamba-ssm "
                     f"{t['mamba-ssm'] * 1e3:.3f} ms, ratio mamba/ours {t['mamba-ssm'] / t['ours']:.2f}\n")


# the backward tiles the sweep times: the shipped tile first, then others that spill nothing on sm_90
# (triton_sm90.py: more warps, shorter chunks, two channels per thread), then one that spills a little but has
# longer chunks (gpu_suite.sh's tiles stage checks the same ones)
SWEEP_BWD_TILES = ("32,8,1", "64,8,2", "32,4,1", "64,4,1", "32,16,1")


def section_sweep(lines):
    """Both scan kernels at other tiles (TOKENPRUNE_SCAN_FWD_TILE / TOKENPRUNE_SCAN_TILE), ViM-S shape, bf16."""
    (b, E, L), N = size(128, 768, 197), 16
    lines.append("\n### Tile sweep (bidirectional fused scan, bf16, ViM-S shape; ptxas spills per tile in "
                 "results_triton_sm90.md)\n")
    x = scan_inputs(b, E, N, L, torch.bfloat16, ndir=2)
    irows = []  # the forward kernel (inference: no saved states), T steps per thread x warps
    for tile in ("32,2", "16,2", "32,4", "16,4", "8,2", "32,1"):
        os.environ["TOKENPRUNE_SCAN_FWD_TILE"] = tile
        try:
            with torch.no_grad():
                t = bench({"f": lambda: fused_selective_scan(
                    x["u"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], A1=x["A1"],
                    D1=x["D1"], bias1=x["bias1"], softplus=True)}, iters=10, rounds=3)["f"]
            irows.append({"forward T,warps": tile, "fwd ms": f"{t * 1e3:.3f}"})
        except Exception as exc:  # noqa: BLE001
            irows.append({"forward T,warps": tile, "fwd ms": f"failed: {type(exc).__name__}: {exc}"[:120]})
        os.environ.pop("TOKENPRUNE_SCAN_FWD_TILE")
    lines.append(table(irows, ["forward T,warps", "fwd ms"]) + "\n")
    srows = []  # training: the backward's tile (its T is also the chunk of the states the forward saves)
    for tile in SWEEP_BWD_TILES:
        os.environ["TOKENPRUNE_SCAN_TILE"] = tile
        try:
            leaves = {k: v.clone().requires_grad_() if v is not None and v.is_floating_point() else v
                      for k, v in x.items()}
            gy = torch.randn_like(x["z"])

            def fwd_bwd():
                fused_selective_scan(leaves["u"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                                     leaves["D"], leaves["z"], leaves["bias"], A1=leaves["A1"],
                                     D1=leaves["D1"], bias1=leaves["bias1"], softplus=True).backward(gy)
            tb = bench({"fb": fwd_bwd}, iters=5, rounds=3)["fb"]
            srows.append({"backward BE,T,warps": tile, "fwd+bwd ms": f"{tb * 1e3:.3f}"})
        except Exception as exc:  # noqa: BLE001
            srows.append({"backward BE,T,warps": tile,
                          "fwd+bwd ms": f"failed: {type(exc).__name__}: {exc}"[:120]})
        os.environ.pop("TOKENPRUNE_SCAN_TILE")
    lines.append(table(srows, ["backward BE,T,warps", "fwd+bwd ms"]))


def section_mixer(lines):
    """One ViM-S mixer (batch 128): ours (fused, both directions) vs mamba-ssm's fused ``mamba_inner_fn`` per
    direction (the official kernels; backward direction on the flipped sequence, each with out_proj W/2, which
    equals out_proj of the mean since out_proj is per token), forward and forward+backward, fp32 and bf16."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    mixer = timm.create_model(VIM).layers[0].mixer.to(DEV)
    b, _, L = size(128, 0, 197)
    dim = mixer.dim

    def theirs(h):
        xz = (mixer.in_proj.weight @ h.reshape(b * L, dim).t()).view(-1, b, L).transpose(0, 1)
        half = mixer.out_proj.weight / 2

        def one(xz_, sfx):
            conv, x_proj, dt_proj = (getattr(mixer, n + sfx) for n in ("conv1d", "x_proj", "dt_proj"))
            A_log, D = (mixer.A_log, mixer.D) if not sfx else (mixer.A_b_log, mixer.D_b)
            return mamba_inner_fn(xz_, conv.weight, conv.bias, x_proj.weight, dt_proj.weight, half, None,
                                  -torch.exp(A_log.float()), None, None, D.float(), delta_bias=dt_proj.bias.float(),
                                  delta_softplus=True)
        return one(xz, "") + one(xz.flip(-1), "_b").flip(1)

    def ours(h):
        with scan_impl("triton"):
            return mixer(h)[0]
    rows = []
    for amp in (False, True):
        h = torch.randn(b, L, dim, device=DEV, requires_grad=True)
        g = torch.randn(b, L, dim, device=DEV)

        def fwd(fn):
            def run():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    fn(h)
            return run

        def fwd_bwd(fn):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = fn(h)
                out.float().backward(g)
            return run
        t = bench({"ours fwd": fwd(ours), "mamba fwd": fwd(theirs), "ours fwd+bwd": fwd_bwd(ours),
                   "mamba fwd+bwd": fwd_bwd(theirs)}, iters=10, rounds=3)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            diff = (ours(h).float() - theirs(h).float()).abs().max().item()
        rows.append({"dtype": "bf16 autocast" if amp else "fp32", "ours fwd ms": f"{t['ours fwd'] * 1e3:.3f}",
                     "mamba-ssm fwd ms": f"{t['mamba fwd'] * 1e3:.3f}",
                     "fwd mamba/ours": f"{t['mamba fwd'] / t['ours fwd']:.2f}",
                     "ours fwd+bwd ms": f"{t['ours fwd+bwd'] * 1e3:.3f}",
                     "mamba-ssm fwd+bwd ms": f"{t['mamba fwd+bwd'] * 1e3:.3f}",
                     "fwd+bwd mamba/ours": f"{t['mamba fwd+bwd'] / t['ours fwd+bwd']:.2f}",
                     "max abs diff": f"{diff:.1e}"})
    lines.append("\n### One ViM-S bidirectional mixer (batch 128): ours vs mamba-ssm's mamba_inner_fn per direction\n")
    lines.append(table(rows, list(rows[0])))


def section_length(lines):
    (b, E, _), N = size(64, 768, 197), 16
    rows, base = [], None
    for L in ((197, 158, 118, 99) if not SMOKE else (21, 11)):
        x = scan_inputs(b, E, N, L, torch.float32, ndir=2)
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        gy = torch.randn(b, E, L, device=DEV)

        def fwd():  # noqa: F811
            with torch.no_grad():
                fused_selective_scan(x["u"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"],
                                     A1=x["A1"], D1=x["D1"], bias1=x["bias1"], softplus=True)

        def fwd_bwd():
            v = leaves
            fused_selective_scan(v["u"], v["dt"], v["A"], v["B"], v["C"], v["D"], v["z"], v["bias"], A1=v["A1"],
                                 D1=v["D1"], bias1=v["bias1"], softplus=True).backward(gy)
        t = bench({"fwd": fwd, "fwd_bwd": fwd_bwd}, iters=10)
        base = base or t
        rows.append({"L": L, "fwd ms": f"{t['fwd'] * 1e3:.3f}", "fwd+bwd ms": f"{t['fwd_bwd'] * 1e3:.3f}",
                     "fwd ÷ L=197": f"{t['fwd'] / base['fwd']:.2f}",
                     "fwd+bwd ÷ L=197": f"{t['fwd_bwd'] / base['fwd_bwd']:.2f}"})
    lines.append("\n### Bidirectional scan time vs sequence length (batch 64, E 768, fp32)\n")
    lines.append(table(rows, ["L", "fwd ms", "fwd+bwd ms", "fwd ÷ L=197", "fwd+bwd ÷ L=197"]))


def images_per_s(model, batch, amp, iters=10, rounds=3):
    x = torch.randn(batch, 3, IMG, IMG, device=DEV)

    def run():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
            model(x)
    with torch.inference_mode():
        t = bench({"m": run}, iters=iters, rounds=rounds, warmup=3)["m"]
    return batch / t


def section_models(lines, impls):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    small = {"depth": 2} if SMOKE else {}
    vim = timm.create_model(VIM, **small).to(DEV).eval()
    deit = timm.create_model(DEIT, **small).to(DEV).eval()
    batch = 2 if SMOKE else 128
    rows = []
    res = {}
    for amp in (False, True):
        d = images_per_s(deit, batch, amp)
        res[("deit", amp)] = d
        for impl in impls:
            with scan_impl(impl):
                v = images_per_s(vim, batch, amp)
            res[(impl, amp)] = v
            rows.append({"dtype": "bf16 autocast" if amp else "fp32 (TF32)", "ViM-S scan": impl,
                         "ViM-S img/s": f"{v:,.0f}", "DeiT-S img/s": f"{d:,.0f}", "ViM-S ÷ DeiT-S": f"{v / d:.3f}"})
    lines.append("\n### ViM-S vs DeiT-S inference, batch 128, 224²\n")
    lines.append(table(rows, ["dtype", "ViM-S scan", "ViM-S img/s", "DeiT-S img/s", "ViM-S ÷ DeiT-S"]))
    for impl in impls:
        lines.append(f"\nViM-S bf16 ÷ fp32 images/s ({impl}): {res[(impl, True)] / res[(impl, False)]:.2f}")
    # logits of the fused path vs the reference loop (fp32, TF32 off for the comparison)
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(2, 3, IMG, IMG, device=DEV)
    with torch.inference_mode():
        with scan_impl("triton"):
            a = vim(x)
        with scan_impl("reference"):
            b = vim(x)
    lines.append(f"\nViM-S logits, fused Triton path vs reference loop (fp32, TF32 off, batch 2): max abs diff "
                 f"{(a - b).abs().max().item():.2e}\n")
    torch.backends.cuda.matmul.allow_tf32 = True
    return vim, deit


def train_step_rate(model, batch=64, iters=5, rounds=3):
    batch = 2 if SMOKE else batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, IMG, IMG, device=DEV)
    y = torch.randint(0, model.num_classes, (batch,), device=DEV)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.train()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = bench({"s": step}, iters=iters, rounds=rounds, warmup=2)["s"]
    return batch / t, (torch.cuda.max_memory_allocated() / 2 ** 30 if DEV == "cuda" else float("nan"))


def section_train(lines, vim, deit, impls):
    rows = []
    d, dm = train_step_rate(deit)
    for impl in impls:
        with scan_impl(impl):
            v, vm = train_step_rate(vim)
        rows.append({"ViM-S scan": impl, "ViM-S img/s": f"{v:,.0f}", "ViM-S peak GiB": f"{vm:.1f}",
                     "DeiT-S img/s": f"{d:,.0f}", "ViM-S ÷ DeiT-S": f"{v / d:.3f}"})
    lines.append("\n### Training step (fwd+bwd+AdamW), bf16 autocast, batch 64\n")
    lines.append(table(rows, ["ViM-S scan", "ViM-S img/s", "ViM-S peak GiB", "DeiT-S img/s", "ViM-S ÷ DeiT-S"]))


def section_kernels(lines, vim):
    from torch.profiler import ProfilerActivity, profile
    if DEV != "cuda":
        return
    vim.eval()
    x = torch.randn(8, 3, IMG, IMG, device=DEV)
    with torch.inference_mode():
        vim(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            vim(x)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    depth = len(vim.layers)
    lines.append(f"\nKernels per ViM-S forward (torch.profiler, batch 8, fp32): {len(kernels)} "
                 f"({len(kernels) / depth:.1f} per block over {depth} blocks)\n")


SECTIONS = ("scan", "mixer", "length", "models", "kernels", "train", "sweep")
DEFAULT_SECTIONS = SECTIONS[:-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/gpu_h200/ssm.md")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma list of {', '.join(SECTIONS)} (models also feeds kernels and train)")
    ap.add_argument("--sweep", action="store_true", help="also time a few scan tile sizes (the sweep section)")
    ap.add_argument("--quick", action="store_true", help="skip the training step")
    ap.add_argument("--impls", default="triton", help="comma list of ViM scan impls for the model tables")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes and models on CPU (run with TRITON_INTERPRET=1): checks the script only")
    args = ap.parse_args()
    want = [s for s in args.sections.split(",") if s]
    bad = sorted(set(want) - set(SECTIONS))
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; expected a comma list of {', '.join(SECTIONS)}")
    if args.sweep and "sweep" not in want:
        want.append("sweep")
    if args.quick and "train" in want:
        want.remove("train")
    global DEV, SMOKE, VIM, DEIT, IMG
    if args.smoke:
        DEV, SMOKE, VIM, DEIT, IMG = "cpu", True, "vim_micro_patch8_56", "deit_micro_patch8_56", 56
    impls = args.impls.split(",")
    try:
        import mamba_ssm  # noqa: F401
        have_mamba = True
        if "cuda" not in impls:
            impls.append("cuda")  # the model with mamba-ssm's selective_scan_fn per direction, side by side
    except Exception:  # noqa: BLE001
        have_mamba = False
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    lines = [header("SSM path on the GPU (issue 16)" + (" [smoke run on CPU: not a measurement]" if SMOKE else ""))
             + f"- sections: {', '.join(want)}\n"]
    written = 0

    def flush():
        # each section's table is printed and appended as soon as it is done: a run cut off at the device's
        # time limit keeps every finished section
        nonlocal written
        text = "\n".join(lines[written:]) + "\n"
        written = len(lines)
        print(text, flush=True)
        with open(args.out, "a") as fh:
            fh.write(text)

    models = {}

    def run_models():
        models["vim"], models["deit"] = section_models(lines, impls)

    def need_models(fn):
        def run():
            if not models:
                run_models()
            fn()
        return run
    steps = {"scan": lambda: section_scan(lines),
             "mixer": lambda: section_mixer(lines) if have_mamba else lines.append(
                 "\nmixer section skipped: mamba-ssm is not importable here\n"),
             "length": lambda: section_length(lines),
             "models": run_models,
             "kernels": need_models(lambda: section_kernels(lines, models["vim"])),
             "train": need_models(lambda: section_train(lines, models["vim"], models["deit"], impls)),
             "sweep": lambda: section_sweep(lines)}
    t0 = time.time()
    for name in SECTIONS:
        if name not in want:
            continue
        try:
            steps[name]()
        except Exception as exc:  # noqa: BLE001  (one failing section must not lose the others)
            import traceback
            lines.append(f"\n{name} section failed: `{type(exc).__name__}: {exc}`\n```\n{traceback.format_exc()}```\n")
        print(f"[{time.time() - t0:.0f}s] {name} done", flush=True)
        flush()
    lines.append("")
    flush()


if __name__ == "__main__":
    main()
