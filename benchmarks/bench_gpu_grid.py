"""Every preset x backbone x budget x dtype x {inference, training step}: measured speed-up next to its FLOPs
ratio, all variants of a backbone interleaved in one run; one markdown table with device, date and command.

    python benchmarks/bench_gpu_grid.py                        # default grid (GPU; well under 3 min on an H200)
    python benchmarks/bench_gpu_grid.py --reductions 0.2,0.3,0.4,0.5 --presets papr_ss,tome,hsa
    python benchmarks/bench_gpu_grid.py --backbones vim_s,deit_s,plainmamba_l3 --compile cudagraph
    python benchmarks/bench_gpu_grid.py --device cpu --tiny    # smoke run (test-sized models)
    python benchmarks/bench_gpu_grid.py --flops-only           # fill the FLOPs cache (CPU, no timing)

Default grid: ViM-S and DeiT-S, unpruned + every applicable preset at 40 % token reduction (solve_keep: the
per-stage keep whose token reduction is 40 %), fp32 and bf16 autocast, inference (batch 128, eval,
inference_mode; tokenprune.bench.compare_throughput) and training step (batch 64, fwd + bwd + AdamW, each
variant with its own optimizer; the backbone weights are shared, lr 0 so they stay put). Speed-ups are
against the unpruned model of the same backbone, dtype and mode, timed interleaved in the same rounds.
Inference rows also give the host time and the gap-free GPU time of one forward and their ratio
(tokenprune.bench.host_time; host ÷ GPU above 1 means launch-bound, issue 17 asks for <= 0.5).
FLOPs are fvcore counts at batch 1 (tokenprune.count_flops, proposal network included), cached by
(backbone, preset, keep, proposal) in benchmarks/flops_cache.json, so a GPU run spends no CPU time on them.
PaPr uses a MobileNetV2-1.0 proposal (random weights: speed does not depend on them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Dict, List

import timm
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tokenprune  # noqa: E402
from common import BACKBONES, TINY_BACKBONES, build_variant, header, presets_for  # noqa: E402
from tokenprune.bench import compare_throughput  # noqa: E402
from tokenprune.bench.throughput import _Clock, as_dtype  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_cache(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as fh:
            return json.load(fh)
    return {}


def flops_of(cache: dict, key: str, model) -> float:
    if key not in cache:
        cache[key] = float(tokenprune.count_flops(model).total)
    return cache[key]


def _host_gpu_cells(result: dict) -> str:
    """'host ms | GPU ms | host ÷ GPU' of one forward (GPU runs; '-' on CPU); '(gaps)' when the GPU time could
    not be taken without host gaps (tokenprune.bench.host_time)."""
    if result.get("gpu_ms_per_batch") is None:
        return "- | - | -"
    gaps = "" if result["host_gpu_gapless"] else " (gaps)"
    return (f"{result['host_ms_per_batch']:.2f} | {result['gpu_ms_per_batch']:.2f}{gaps} | "
            f"{result['host_over_gpu']:.2f}")


def build_grid(key: str, names: Dict[str, str], args, cache: dict):
    """{label: (model, preset, reduction, keep, flops)} for one backbone; the first is the unpruned model."""
    torch.manual_seed(0)
    base = timm.create_model(names[key])
    proposal = timm.create_model("papr_convnet_micro" if args.tiny else args.proposal).eval()
    presets = presets_for(tokenprune.create_model(base).backbone)
    if args.presets:
        presets = [p for p in args.presets.split(",") if p in presets]
    out = {}
    model, keep = build_variant(base, None, 0.0)
    out["unpruned"] = (model, "unpruned", 0.0, 1.0, flops_of(cache, f"{names[key]}|unpruned|1", model))
    for r in args.reduction_list:
        for p in presets:
            model, keep = build_variant(base, p, r, proposal=proposal)
            prop = f"|{'papr_convnet_micro' if args.tiny else args.proposal}" if p.startswith("papr") else ""
            fl = flops_of(cache, f"{names[key]}|{p}|{keep:.6g}{prop}", model)
            out[f"{p} -{int(round(r * 100))}%"] = (model, p, r, keep, fl)
    for m, *_ in out.values():
        m.set_compile(args.compile)
    return out


def compare_train_step(models: dict, input_size, batch: int, warmup: int, iters: int, rounds: int, device,
                       dtype) -> Dict[str, float]:
    """Training steps/s of each model (fwd + bwd + AdamW), interleaved in rounds as compare_throughput."""
    dev = torch.device(device)
    dt = as_dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_size, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    amp = torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext()
    opts = {}
    for n, m in models.items():
        m.to(dev).train()
        params = [p for p in m.parameters() if p.requires_grad]
        opts[n] = torch.optim.AdamW(params, lr=0.0, foreach=True)  # lr 0: shared weights stay put

    def step(n):
        opts[n].zero_grad(set_to_none=True)
        with amp:
            logits = models[n](x)
        torch.nn.functional.cross_entropy(logits.float(), y % logits.shape[-1]).backward()
        opts[n].step()

    clock = _Clock(dev)
    times = {n: 0.0 for n in models}
    names = list(models)
    for n in names:
        for _ in range(warmup):
            step(n)
    per_round = max(1, iters // rounds)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            clock.start()
            for _ in range(per_round):
                step(n)
            times[n] += clock.stop()
    for n, m in models.items():
        m.eval()
        opts[n].zero_grad(set_to_none=True)
    del opts
    return {n: per_round * rounds * batch / t for n, t in times.items()}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="vim_s,deit_s", help="of vim_s, deit_s, plainmamba_l3")
    ap.add_argument("--presets", default=None, help="comma-separated; default every applicable preset")
    ap.add_argument("--reductions", default="0.4", help="token reductions, e.g. 0.2,0.3,0.4,0.5")
    ap.add_argument("--modes", default="inference,train")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=128, help="inference batch")
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per variant (split into rounds)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", default="none", help="none | compile | cudagraph (inference forward)")
    ap.add_argument("--proposal", default="mobilenetv2_100")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="test-sized backbones at 32 px (smoke runs)")
    ap.add_argument("--flops-only", action="store_true", help="fill the FLOPs cache and stop (CPU)")
    ap.add_argument("--flops-cache", default=os.path.join(HERE, "flops_cache.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results_gpu_grid.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.reduction_list = [float(r) for r in args.reductions.split(",")]
    names = TINY_BACKBONES if args.tiny else BACKBONES
    size = (3, 32, 32) if args.tiny else (3, 224, 224)
    bad = [m for m in args.modes.split(",") if m not in ("inference", "train")]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; expected a comma list of inference, train")
    cache = load_cache(args.flops_cache)
    t_start = time.perf_counter()
    batch = f"batch {args.batch} inference / {args.train_batch} training"
    parts: List[str] = []

    def emit(text: str) -> None:
        # written as it goes: a run cut off at the device's time limit, or a block that fails, keeps every
        # finished row in --out
        parts.append(text)
        print(text, end="", flush=True)
        if not args.no_write:
            with open(args.out, "a") as fh:
                fh.write(text)

    if not args.flops_only:
        emit(header(f"GPU grid: speed-up vs FLOPs ratio ({batch}, compile={args.compile})") +
             f"- device: {args.device}; {args.warmup} warm-up + {args.iters} timed iterations per variant, "
             f"{args.rounds} interleaved rounds\n\n"
             "| backbone | mode | dtype | variant | keep/stage | GFLOPs | FLOPs ratio | images/s | speed-up "
             "| speed-up ÷ FLOPs ratio | host ms / fwd | GPU ms / fwd | host ÷ GPU |\n"
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for key in args.backbones.split(","):
        if key not in names:
            raise SystemExit(f"unknown backbone {key!r}; expected one of {sorted(names)}")
        grid = build_grid(key, names, args, cache)
        with open(args.flops_cache, "w") as fh:
            json.dump(cache, fh, indent=1, sort_keys=True)
        print(f"{key}: {len(grid)} variants built ({time.perf_counter() - t_start:.0f} s)", flush=True)
        if args.flops_only:
            continue
        models = {k: v[0] for k, v in grid.items()}
        base_flops = grid["unpruned"][4]
        for mode in args.modes.split(","):
            for dtype in args.dtypes.split(","):
                try:
                    if mode == "inference":
                        res = compare_throughput(models, size, args.batch, args.warmup, args.iters,
                                                 device=args.device, dtype=dtype, reference="unpruned",
                                                 rounds=args.rounds)
                        ips = {k: v["images_per_s"] for k, v in res["models"].items()}
                        launch = {k: _host_gpu_cells(v) for k, v in res["models"].items()}
                    else:
                        ips = compare_train_step(models, size, args.train_batch, args.warmup, args.iters,
                                                 args.rounds, args.device, dtype)
                        launch = {k: "- | - | -" for k in ips}
                except Exception as exc:  # noqa: BLE001  (e.g. out of memory: the other blocks still run)
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200].replace("|", "/")
                    emit(f"| {key} | {mode} | {dtype} | failed: {msg} |" + " - |" * 9 + "\n")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                rows = []
                for k, (m, preset, r, keep, fl) in grid.items():
                    ratio = base_flops / fl
                    speed = ips[k] / ips["unpruned"]
                    rows.append(f"| {key} | {mode} | {dtype} | {k} | {keep:.3g} | {fl / 1e9:.3f} | {ratio:.2f} | "
                                f"{ips[k]:.1f} | {speed:.2f} | {speed / ratio:.2f} | {launch[k]} |\n")
                emit("".join(rows))
                print(f"  {key} {mode} {dtype} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        for m in models.values():
            m.cpu()
        del models, grid
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.flops_only:
        return ""
    emit(f"\n- total {time.perf_counter() - t_start:.0f} s\n\n")
    if not args.no_write:
        print(f"appended to {args.out}")
    return "".join(parts)


if __name__ == "__main__":
    main()
