"""Peak GPU memory of one ViM / PlainMamba training step (forward + backward) with and without gradient
checkpointing (``model.set_grad_checkpointing()``), and the largest relative gradient difference between
the two. From the repository root, on a CUDA machine:

    PYTHONPATH=src python benchmarks/bench_grad_checkpointing.py vim_small_patch16_224:64 plainmamba_l2:64

Arguments are name:batch pairs (224x224 inputs, drop_path 0.1, fp32). Prints one JSON line per model: the
peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the step, the step times
(a ratio, not a benchmark of either), and the scan implementation that ran.
"""
import json
import sys
import time

import timm
import torch

import tokenprune  # noqa: F401  (registers the models)
from tokenprune.ssm import get_scan_impl


def step(model, x, y, checkpointing: bool):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    torch.manual_seed(0)  # the same DropPath masks in both runs
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cuda.max_memory_allocated() - base, seconds, grads


def main(pairs):
    for name, batch in ((n, int(b)) for n, b in (p.split(":") for p in pairs)):
        torch.manual_seed(0)
        model = timm.create_model(name, drop_path_rate=0.1).cuda().train()
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        y = torch.randint(0, model.num_classes, (batch,), device="cuda")
        step(model, x, y, False)  # warm-up: kernel compilation / autotuning
        plain, t_plain, g_plain = step(model, x, y, False)
        ckpt, t_ckpt, g_ckpt = step(model, x, y, True)
        diff = max(float((g_plain[n] - g_ckpt[n]).abs().max() / (g_plain[n].abs().max() + 1e-12)) for n in g_plain)
        print(json.dumps(dict(model=name, batch=batch, peak_mib=plain / 2**20, peak_mib_checkpointing=ckpt / 2**20,
                              memory_ratio=ckpt / plain, time_ratio=t_ckpt / t_plain, max_rel_grad_diff=diff,
                              scan_impl=get_scan_impl(x), device=torch.cuda.get_device_name(),
                              torch=torch.__version__, timm=timm.__version__)), flush=True)
        del model, g_plain, g_ckpt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or ["vim_small_patch16_224:64", "plainmamba_l2:64"])
