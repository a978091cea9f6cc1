"""Callbacks: FLOPs (once per run), measured throughput (pruned vs unpruned, same run), and a SLURM
requeue guard that moves Lightning's requeue checkpoint to a training-step boundary."""
from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
import warnings
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn

from ..compat import cluster_environment, slurm_requeue_handler

log = logging.getLogger("tokenprune.lit")


def _pruned_model(pl_module: L.LightningModule):
    model = getattr(pl_module, "model", None)
    if model is None:
        raise AttributeError(f"{type(pl_module).__name__} has no `model` attribute (a tokenprune PrunedModel)")
    return model


def _input_size(model, given: Optional[List[int]]):
    if given is not None:
        return tuple(int(v) for v in given)
    from ..flops import default_input_size
    return tuple(default_input_size(model))


def _log_dir(trainer: L.Trainer) -> Optional[str]:
    """``trainer.log_dir`` without its broadcast: the callers run on rank 0 only, and a collective there
    deadlocks DDP (seen under SLURM with 2 ranks)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        folder = logger.log_dir if isinstance(logger, (CSVLogger, TensorBoardLogger)) else logger.save_dir
        if folder:
            return folder
    return trainer.default_root_dir


def _write_json(trainer: L.Trainer, name: str, data: Dict[str, Any]) -> Optional[str]:
    folder = _log_dir(trainer)
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    return path


def _log_to_loggers(trainer: L.Trainer, metrics: Dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


class FlopsCallback(Callback):
    """Counts FLOPs of the model as configured (``tokenprune.count_flops``, batch 1) once per run and logs
    ``flops/gflops`` (everything the model runs), ``flops/gflops_paper`` (ViM-paper convention),
    ``flops/params_m`` (all parameters, the proposal ConvNet included), ``flops/token_reduction``
    (``model.token_reduction()``), and writes ``flops.json`` into the log directory.

    Counted in ``setup`` on global rank 0, while the model is still on the CPU. Logged at fit start (to the
    loggers) or, in validate/test, with the epoch metrics so the keys appear in the results table.

    Args:
        enabled: turn the callback off.
        strict: an op without a FLOP handle stops the count (a warning names the op; nothing is logged);
            with False the partial count is logged.
        input_size: (C, H, W) of one image; default from the backbone's patch embedding.
    """

    def __init__(self, enabled: bool = True, strict: bool = True, input_size: Optional[List[int]] = None):
        self.enabled = enabled
        self.strict = strict
        self.input_size = input_size
        self.metrics: Optional[Dict[str, float]] = None
        self.report = None
        self.size: Optional[tuple] = None
        self._logged_fn: Optional[str] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or self.metrics is not None or not trainer.is_global_zero:
            return
        model = _pruned_model(pl_module)
        from ..flops import UncountedOpError, count_flops
        size = _input_size(model, self.input_size)
        device = next(model.parameters()).device
        counted = model if device.type == "cpu" else copy.deepcopy(model).cpu()
        try:
            report = count_flops(counted, input_size=size, strict=self.strict)
        except UncountedOpError as exc:
            warnings.warn(f"FLOPs not logged: {exc}")
            return
        self.report = report
        self.size = size
        params = sum(p.numel() for p in model.parameters())
        reduction = model.token_reduction() if hasattr(model, "token_reduction") else 0.0
        self.metrics = {
            "flops/gflops": report.total / 1e9,
            "flops/gflops_paper": (report.paper if report.paper is not None else report.total) / 1e9,
            "flops/params_m": params / 1e6,
            "flops/token_reduction": float(reduction),
        }
        log.info("FLOPs: %.3f G (paper convention %.3f G), %.2f M params, token reduction %.1f %%",
                 self.metrics["flops/gflops"], self.metrics["flops/gflops_paper"], params / 1e6, 100 * reduction)

    def _dump(self, trainer: L.Trainer) -> None:
        if self.metrics is None or self.report is None:
            return
        _write_json(trainer, "flops.json", {**self.metrics, "input_size": list(self.size or ()),
                                            "by_operator": self.report.by_operator})

    def on_fit_start(self, trainer, pl_module):
        if self.metrics is not None and self._logged_fn != "fit":
            _log_to_loggers(trainer, self.metrics)
            self._dump(trainer)
            self._logged_fn = "fit"

    def _log_eval(self, trainer, pl_module, fn: str):
        if self.metrics is None or trainer.sanity_checking or trainer.state.fn == TrainerFn.FITTING:
            return
        if self._logged_fn == fn:
            return
        for k, v in self.metrics.items():
            pl_module.log(k, v, rank_zero_only=True)
        self._dump(trainer)
        self._logged_fn = fn

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log_eval(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer, pl_module):
        self._log_eval(trainer, pl_module, "test")


class ThroughputCallback(Callback):
    """Measures the pruned model against the unpruned one (same weights, no reduction stages) in the same run
    with :func:`tokenprune.bench.compare_throughput`, on global rank 0, on the module's device.

    When: at the end of ``validate`` / ``test`` (logged with the epoch metrics, so it works for training-free
    evaluation) and at the end of ``fit`` (logged to the loggers). The fit measurement runs in
    ``on_train_end``: Lightning 2.6 tears the strategy down (moving the module to the CPU) *before* it calls
    ``on_fit_end``, so measuring there timed the CPU. It runs on ``trainer.strategy.root_device``, and the
    record says so (``measured_on``, ``hook``). Logs ``throughput/images_per_s``,
    ``throughput/images_per_s_unpruned``, ``throughput/speedup``, ``throughput/peak_mem_mb`` and
    ``throughput/peak_mem_mb_unpruned``; writes ``throughput.json`` (device, dtype, batch, versions, per-round
    ratios) into the log directory.

    Args:
        enabled: turn the callback off.
        batch_size, warmup, iters, rounds: measurement settings (convention: >= 10 warm-up, >= 30 timed).
        dtype: float32, or bfloat16/float16 (autocast).
        input_size: (C, H, W); default from the backbone.
        on_validate, on_test, on_fit_end: when to measure (on_fit_end: once training ends, before teardown).
        compile: measure both models in this mode ("none", "compile", "cudagraph"); default: the model's own
            (``model.compile_mode``). The record says which ran (``compile``).
        verbose: progress bar.
    """

    def __init__(self, enabled: bool = True, batch_size: int = 64, warmup: int = 10, iters: int = 30,
                 rounds: int = 5, dtype: str = "float32", input_size: Optional[List[int]] = None,
                 on_validate: bool = True, on_test: bool = True, on_fit_end: bool = True, verbose: bool = True,
                 compile: Optional[str] = None):
        self.enabled = enabled
        self.batch_size, self.warmup, self.iters, self.rounds = batch_size, warmup, iters, rounds
        self.dtype = dtype
        self.input_size = input_size
        self.on_validate, self.on_test, self.on_fit_end_ = on_validate, on_test, on_fit_end
        self.verbose = verbose
        if compile is not None:
            from ..pruning.capture import check_mode
            check_mode(compile)
        self.compile = compile
        self.result: Optional[Dict[str, Any]] = None
        self.metrics: Optional[Dict[str, float]] = None

    def measure(self, pl_module: L.LightningModule, device=None, hook: Optional[str] = None) -> Dict[str, float]:
        """Time pruned vs unpruned on `device` (default: the module's device)."""
        from ..bench import compare_throughput
        device = torch.device(device) if device is not None else pl_module.device
        model = _pruned_model(pl_module)
        models = {"pruned": model}
        if getattr(model, "stages", None) is not None and len(model.stages) > 0:
            unpruned = pl_module.unpruned_model() if hasattr(pl_module, "unpruned_model") else None
            if unpruned is None:
                from ..pruning.stage import PrunedModel
                unpruned = PrunedModel(model.backbone, [], method=None)
            models["unpruned"] = unpruned
        ref = "unpruned" if "unpruned" in models else "pruned"
        mode = self.compile or getattr(model, "compile_mode", "none")
        saved = {n: getattr(m, "compile_mode", None) for n, m in models.items()}
        try:
            for n, m in models.items():
                if saved[n] is not None and saved[n] != mode:
                    m.set_compile(mode)
            result = compare_throughput(models, _input_size(model, self.input_size), self.batch_size,
                                        self.warmup, self.iters, device=device, dtype=self.dtype, reference=ref,
                                        rounds=self.rounds, verbose=self.verbose)
        finally:
            for n, m in models.items():
                if saved[n] is not None and saved[n] != mode:
                    m.set_compile(saved[n])
        result["compile"] = mode
        result["measured_on"] = str(device)
        result["hook"] = hook
        self.result = result
        p, u = result["models"]["pruned"], result["models"][ref]
        self.metrics = {
            "throughput/images_per_s": p["images_per_s"],
            "throughput/images_per_s_unpruned": u["images_per_s"],
            "throughput/speedup": result["speedup"]["pruned"],
            "throughput/peak_mem_mb": p["peak_mem_mb"],
            "throughput/peak_mem_mb_unpruned": u["peak_mem_mb"],
        }
        log.info("throughput on %s (%s, batch %d): pruned %.1f img/s, unpruned %.1f img/s, speed-up %.3f",
                 result["device_name"], result["dtype"], self.batch_size, p["images_per_s"], u["images_per_s"],
                 result["speedup"]["pruned"])
        return self.metrics

    def _eval_end(self, trainer, pl_module, fn: str):
        if not self.enabled or trainer.sanity_checking or trainer.state.fn == TrainerFn.FITTING:
            return
        if not trainer.is_global_zero:
            return
        metrics = self.measure(pl_module, trainer.strategy.root_device, hook=fn)
        for k, v in metrics.items():
            pl_module.log(k, v, rank_zero_only=True)
        _write_json(trainer, "throughput.json", self.result)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.on_validate:
            self._eval_end(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer, pl_module):
        if self.on_test:
            self._eval_end(trainer, pl_module, "test")

    def on_train_end(self, trainer, pl_module):
        # not on_fit_end: Lightning's strategy teardown has moved the module to the CPU by then (docs/CONVENTIONS.md)
        if not (self.enabled and self.on_fit_end_) or not trainer.is_global_zero:
            return
        metrics = self.measure(pl_module, trainer.strategy.root_device, hook="train_end")
        _log_to_loggers(trainer, metrics)
        _write_json(trainer, "throughput.json", self.result)


class RequeueAtStepBoundary(Callback):
    """Makes Lightning's SLURM auto-requeue checkpoint consistent (and so the resume exact).

    Lightning's handler for the requeue signal (``SLURMEnvironment(auto_requeue=True,
    requeue_signal=SIGUSR1)``) saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue`` *inside the signal
    handler*, i.e. at any point of a training step (between the optimizer's parameter updates, or with ranks
    at different steps). This callback keeps Lightning's handler but defers it: the signal only sets a flag;
    at the end of the next optimizer step (every ``check_every_n_steps``; never inside a gradient
    accumulation, whose partial gradients a checkpoint does not hold) the flag is combined over ranks
    (one all-reduce) and, if any rank got the signal, every rank calls Lightning's handler at the same step
    boundary, then the process exits at once (status 0; the job is already requeued). A signal that arrives during
    validation is handled after the next training batch; one that arrives during start-up is held by train.py's
    ``EarlyRequeueSignal`` and handled at the first step. Inert unless the cluster environment is SLURM with
    auto-requeue.
    """

    def __init__(self, enabled: bool = True, check_every_n_steps: int = 1):
        self.enabled = enabled
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self._signal: Optional[int] = None
        self._lightning_handler = None
        self._previous = None
        self._pending = False
        self._last_step: Optional[int] = None
        self.handled_at_step: Optional[int] = None

    def _env(self, trainer) -> Optional[SLURMEnvironment]:
        env = cluster_environment(trainer)
        return env if isinstance(env, SLURMEnvironment) and env.auto_requeue else None

    def on_train_start(self, trainer, pl_module):
        env = self._env(trainer) if self.enabled else None
        if env is None or env.requeue_signal is None:
            return
        sig = env.requeue_signal
        handler = self._previous = signal.getsignal(sig)
        if isinstance(getattr(handler, "received", None), bool):
            # train.py's EarlyRequeueSignal held the signal since start-up, so Lightning kept it and did not install
            # its own handler: call Lightning's handler function directly, and act on a signal that came early
            self._pending = handler.received
            if handler.received:
                log.info("requeue signal received during start-up: handled at the first training-step boundary")
            handler = slurm_requeue_handler(trainer)
        if not callable(handler):
            log.warning("requeue guard: no handler for %s is installed; Lightning's auto-requeue is off", sig)
            return
        self._signal, self._lightning_handler = sig, handler
        self._last_step = trainer.global_step
        signal.signal(sig, self._defer)
        log.info("requeue guard: %s is handled at the next training-step boundary", signal.Signals(sig).name)

    def _defer(self, signum, frame):
        self._pending = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._lightning_handler is None:
            return
        step = trainer.global_step
        stepped = step != self._last_step  # an optimizer step ended this batch (not mid-accumulation)
        self._last_step = step
        if not stepped or step % self.check_every_n_steps:
            return
        flag = torch.tensor(1.0 if self._pending else 0.0, device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        if float(flag) > 0:
            log.info("requeue signal: saving the requeue checkpoint at step %d", trainer.global_step)
            self._pending = False
            self.handled_at_step = trainer.global_step
            # SLURM sends SIGTERM to every process of the step as soon as the job is requeued (DataLoader workers
            # too, which then fail the next fetch), SIGKILL after KillWait. Lightning's SIGTERM handler enters a
            # collective, with ranks that are already leaving: ignore SIGTERM, this run ends here anyway
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._lightning_handler(self._signal, None)
            # End the run here: stopping the fit instead ran a validation and could write checkpoints newer than
            # the requeue one, or be killed mid-write; a Python exit tore down DataLoader workers and the process
            # group with peers that SLURM is killing, and hung until SIGKILL. The checkpoint and logs are written.
            log.info("requeue checkpoint written and job requeued: this run ends at step %d", trainer.global_step)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def on_train_end(self, trainer, pl_module):
        if self._lightning_handler is not None:
            signal.signal(self._signal, self._previous)
            self._lightning_handler = None
