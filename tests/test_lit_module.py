"""PruningClassifier and the callbacks, in process on tiny models (no subprocess, no DDP)."""
import json
import os
import sys
import types
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, TensorDataset

from tokenprune.lit import FlopsCallback, PruningClassifier, ThroughputCallback, WarmupCosine
from tokenprune.data.resume import ResumableShardDataModule, ResumableTrainLoader
from tokenprune.models.checkpoint import CheckpointMismatchError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))  # helpers
from lit_helpers import make_shards  # noqa: E402  (tests/scripts)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*in eval mode at the start of training.*")


pytestmark = pytest.mark.usefixtures("one_thread")


def learnable_batches(n=16, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    proto = torch.randn(num_classes, 3, 32, 32, generator=g)
    x = proto[y] + 0.3 * torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def quiet_trainer(tmp_path=None, **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kw)
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    return L.Trainer(**defaults)


# ---------------------------------------------------------------------------------------------- optimisation
def test_no_weight_decay_groups():
    m = PruningClassifier("deit_test_patch4_32", "evit", 0.5)
    decay, no_decay = m.parameter_groups()
    names = {id(p): n for n, p in m.model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert "backbone.vit.cls_token" in nd and "backbone.vit.pos_embed" in nd
    assert "backbone.vit.blocks.0.norm1.weight" in nd and "backbone.vit.blocks.0.attn.qkv.bias" in nd
    assert "backbone.vit.blocks.0.attn.qkv.weight" in d and "backbone.vit.head.weight" in d
    assert len(nd) + len(d) == sum(1 for p in m.model.parameters() if p.requires_grad)
    vim = PruningClassifier("vim_test_patch4_32")
    names = {id(p): n for n, p in vim.model.named_parameters()}
    nd = {names[id(p)] for p in vim.parameter_groups()[1]["params"]}
    assert "backbone.layers.0.mixer.D" in nd and "backbone.norm_f.weight" in nd and "backbone.cls_token" in nd
    assert "backbone.layers.0.mixer.in_proj.weight" not in nd
    assert "backbone.layers.0.mixer.A_log" in nd and "backbone.layers.3.mixer.A_b_log" in nd  # no_weight_decay()


def test_warmup_cosine():
    s = WarmupCosine(1e-3, 1e-5, warmup=4, total=20)
    lrs = [s.lr(t) for t in range(25)]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[3:20], lrs[4:21]))
    assert lrs[20] == pytest.approx(1e-5) and lrs[24] == pytest.approx(1e-5)
    assert s(3) == pytest.approx(1.0)
    assert WarmupCosine(1e-3, 0.0, 0, 10).lr(5) == pytest.approx(0.5e-3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="keep must be in"):
        PruningClassifier("vim_test_patch4_32", "top", 1.5)
    with pytest.raises(ValueError, match="distill must be one of"):
        PruningClassifier("vim_test_patch4_32", distill="features")
    with pytest.raises(ValueError, match="ema_decay"):
        PruningClassifier("vim_test_patch4_32", ema_decay=1.5)
    with pytest.raises(ValueError, match="unknown method"):
        PruningClassifier("vim_test_patch4_32", "nope", 0.5)


# ---------------------------------------------------------------------------------------------- weights
def _lightning_ckpt(module: PruningClassifier) -> dict:
    return {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__, "epoch": 0}


def test_checkpoint_file_official_and_lightning(tmp_path):
    import timm

    ref = timm.create_model("vim_test_patch4_32")
    official = tmp_path / "vim_official.pth"
    torch.save({"model": ref.state_dict(), "epoch": 300}, official)
    m = PruningClassifier("vim_test_patch4_32", "top", 0.75, checkpoint_file=str(official))
    for k, v in ref.state_dict().items():
        assert torch.equal(m.model.backbone.state_dict()[k], v), k

    # a Lightning .ckpt of an earlier run (different method and keep): its model.backbone.* weights
    src = PruningClassifier("vim_test_patch4_32", "hsa", 0.5, ema_decay=0.9)
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01)
        for p in src.ema.module.parameters():
            p.sub_(0.02)
    ckpt = tmp_path / "run.ckpt"
    torch.save(_lightning_ckpt(src), ckpt)
    live = PruningClassifier("vim_test_patch4_32", "top", 0.75, checkpoint_file=str(ckpt))
    ema = PruningClassifier("vim_test_patch4_32", None, checkpoint_file=str(ckpt), checkpoint_use_ema=True)
    for k, v in src.model.backbone.state_dict().items():
        assert torch.equal(live.model.backbone.state_dict()[k], v), k
    for k, v in src.ema.module.backbone.state_dict().items():
        assert torch.equal(ema.model.backbone.state_dict()[k], v), k
    assert live.model.method == "top" and live.hparams.keep == 0.75  # the config, not the checkpoint's

    # clear errors
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PruningClassifier("vim_test_patch4_32", checkpoint_file=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="NOT_SET_VAR"):
        PruningClassifier("vim_test_patch4_32", checkpoint_file="$NOT_SET_VAR/x.pth")
    no_ema = tmp_path / "no_ema.ckpt"
    torch.save(_lightning_ckpt(PruningClassifier("vim_test_patch4_32")), no_ema)
    with pytest.raises(CheckpointMismatchError, match="no EMA weights"):
        PruningClassifier("vim_test_patch4_32", checkpoint_file=str(no_ema), checkpoint_use_ema=True)
    other = tmp_path / "deit.ckpt"
    torch.save(_lightning_ckpt(PruningClassifier("deit_test_patch4_32")), other)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        PruningClassifier("vim_test_patch4_32", checkpoint_file=str(other))
    alien = tmp_path / "alien.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "pytorch-lightning_version": "2.6.6"}, alien)
    with pytest.raises(CheckpointMismatchError, match="without 'model"):
        PruningClassifier("vim_test_patch4_32", checkpoint_file=str(alien))
    with pytest.raises(CheckpointMismatchError):
        PruningClassifier("deit_test_patch4_32", checkpoint_file=str(official))


# ---------------------------------------------------------------------------------------------- distillation / EMA
class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_distillation_and_ema_smoke(tmp_path):
    torch.manual_seed(0)
    m = PruningClassifier("deit_test_patch4_32", "evit", 0.5, distill="logits", distill_alpha=0.5, distill_tau=2.0,
                          ema_decay=0.5, lr=2e-3, warmup_steps=1, weight_decay=0.0)
    teacher0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert len(m.teacher.stages) == 0 and len(m.model.stages) == 3
    x, y = learnable_batches(16)
    with torch.no_grad():  # the teacher is the unpruned model with the same starting weights
        dense = PruningClassifier("deit_test_patch4_32")
        dense.model.backbone.load_state_dict(m.model.backbone.state_dict())
        assert torch.equal(m.teacher(x[:4]), dense.model.eval()(x[:4]))
    rec = LossRecorder()
    trainer = quiet_trainer(tmp_path, max_steps=16, callbacks=[rec], limit_val_batches=0)
    trainer.fit(m, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
    assert len(rec.losses) == 16
    assert sum(rec.losses[-4:]) / 4 < 0.9 * sum(rec.losses[:4]) / 4, rec.losses
    for k, v in m.teacher.state_dict().items():  # frozen
        assert torch.equal(v, teacher0[k]), k
    assert not m.teacher.training and not m.ema.module.training
    live, ema = m.model.state_dict(), m.ema.module.state_dict()
    assert any(not torch.equal(live[k], ema[k]) for k in live if live[k].is_floating_point())
    assert m.eval_model is m.ema.module
    # checkpoints: EMA in, teacher out (rebuilt from checkpoint_file), strict reload works
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("ema.module.") for k in sd) and not any(k.startswith("teacher.") for k in sd)
    again = PruningClassifier.load_from_checkpoint(path)
    for k, v in m.ema.module.state_dict().items():
        assert torch.equal(again.ema.module.state_dict()[k], v), k


def test_distillation_from_a_separate_convnet_teacher(tmp_path):
    """DeiT's recipe: a frozen ConvNet teacher (here the PaPr proposal net) read from its weights file."""
    import timm
    torch.manual_seed(0)
    convnet = timm.create_model("papr_convnet_micro").eval()
    weights = tmp_path / "teacher.pth"
    torch.save({"model": convnet.state_dict()}, weights)
    x, y = learnable_batches(16)
    for mode in ("hard", "logits"):
        m = PruningClassifier("deit_test_patch4_32", distill=mode, distill_teacher="papr_convnet_micro",
                              distill_teacher_checkpoint=str(weights), distill_alpha=1.0, distill_tau=2.0)
        assert type(m.teacher).__name__ == "ProposalConvNet" and not m.teacher.training
        assert all(not p.requires_grad for p in m.teacher.parameters())
        with torch.no_grad():
            t = convnet(x)
            assert torch.equal(m.teacher(x), t)  # the file's weights, loaded exactly
            student = m.model(x)
            expect = (torch.nn.functional.cross_entropy(student, t.argmax(-1)) if mode == "hard" else
                      4.0 * torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), torch.log_softmax(t / 2, -1),
                                                       reduction="batchmean", log_target=True))
            assert torch.allclose(m.distill_loss(student, x), expect)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(m, DataLoader(TensorDataset(x, y), batch_size=8))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert not any(k.startswith("teacher.") for k in torch.load(path, weights_only=False)["state_dict"])
    again = PruningClassifier.load_from_checkpoint(path)  # teacher rebuilt from its file
    with torch.no_grad():
        assert torch.equal(again.teacher(x), convnet(x))
    assert again._teacher_changed is None  # the same teacher: resuming goes on
    quiet_trainer(tmp_path / "resume", max_steps=3, limit_val_batches=0).fit(
        again, DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=str(path))
    # the teacher file changed since: evaluating still loads, resuming training is refused
    with torch.no_grad():
        next(convnet.parameters()).add_(1e-3)
    torch.save({"model": convnet.state_dict()}, weights)
    changed = PruningClassifier.load_from_checkpoint(path)
    assert "not the one this checkpoint was trained with" in changed._teacher_changed
    with pytest.raises(RuntimeError, match="restore that file or start a new run"):
        quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(
            changed, DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=str(path))


def test_distillation_teacher_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="together"):
        PruningClassifier("deit_test_patch4_32", distill="hard", distill_teacher="papr_convnet_micro")
    with pytest.raises(ValueError, match="needs distill="):
        PruningClassifier("deit_test_patch4_32", distill_teacher="papr_convnet_micro",
                          distill_teacher_checkpoint="x.pth")
    with pytest.raises(FileNotFoundError, match="distill_teacher_checkpoint not found"):
        PruningClassifier("deit_test_patch4_32", distill="hard", distill_teacher="papr_convnet_micro",
                          distill_teacher_checkpoint=str(tmp_path / "missing.pth"))
    import timm
    weights = tmp_path / "t5.pth"
    torch.save({"model": timm.create_model("papr_convnet_micro", num_classes=5).state_dict()}, weights)
    with pytest.raises(CheckpointMismatchError, match="head"):
        PruningClassifier("deit_test_patch4_32", distill="hard", distill_teacher="papr_convnet_micro",
                          distill_teacher_checkpoint=str(weights))
    # a student with the teacher's (non-default) class count gets that teacher, loaded exactly
    m5 = PruningClassifier("deit_test_patch4_32", num_classes=5, distill="hard",
                           distill_teacher="papr_convnet_micro", distill_teacher_checkpoint=str(weights))
    assert m5.teacher.num_classes == 5
    sd = torch.load(weights, weights_only=True)["model"]
    assert all(torch.equal(v, sd[k]) for k, v in m5.teacher.state_dict().items())
    # a stock timm teacher too: its 5-class head is read from the file, not re-initialised by timm
    torch.manual_seed(1)
    resnet = timm.create_model("test_resnet", num_classes=5).eval()
    torch.save(resnet.state_dict(), tmp_path / "r5.pth")
    m5 = PruningClassifier("deit_test_patch4_32", num_classes=5, distill="logits", distill_teacher="test_resnet",
                           distill_teacher_checkpoint=str(tmp_path / "r5.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m5.teacher(x), resnet(x))


# ---------------------------------------------------------------------------------------------- callbacks
def test_flops_and_throughput_callbacks_log_their_keys(tmp_path):
    x, y = learnable_batches(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    flops = FlopsCallback()
    thr = ThroughputCallback(batch_size=2, warmup=1, iters=3, rounds=3, verbose=False)
    m = PruningClassifier("vim_test_patch4_32", "top", 0.75)
    trainer = quiet_trainer(logger=CSVLogger(str(tmp_path), name="v"), callbacks=[flops, thr])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (res,) = trainer.validate(m, loader)
    for key in ("val/top1", "val/top5", "val/loss", "flops/gflops", "flops/gflops_paper", "flops/params_m",
                "flops/token_reduction", "throughput/images_per_s", "throughput/images_per_s_unpruned",
                "throughput/speedup", "throughput/peak_mem_mb"):
        assert key in res, key
    assert res["flops/token_reduction"] == pytest.approx(m.model.token_reduction())
    assert 0 < res["flops/gflops"] < 0.01 and res["throughput/images_per_s"] > 0
    log_dir = trainer.log_dir
    header = open(f"{log_dir}/metrics.csv").readline()
    assert "flops/gflops" in header and "throughput/speedup" in header
    report = json.load(open(f"{log_dir}/throughput.json"))
    assert report["reference"] == "unpruned" and report["models"]["pruned"]["iters"] == 3
    assert json.load(open(f"{log_dir}/flops.json"))["flops/gflops"] == pytest.approx(res["flops/gflops"])

    # during fit: FLOPs at fit start, throughput at fit end, both in the logger
    m2 = PruningClassifier("deit_test_patch4_32", "evit", 0.5, warmup_steps=0)
    trainer = quiet_trainer(logger=CSVLogger(str(tmp_path), name="f"), max_steps=2, limit_val_batches=1,
                            log_every_n_steps=1,
                            callbacks=[FlopsCallback(), ThroughputCallback(batch_size=2, warmup=1, iters=2,
                                                                           rounds=2, verbose=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(m2, loader, loader)
    text = open(f"{trainer.log_dir}/metrics.csv").read()
    assert "flops/gflops" in text and "throughput/speedup" in text and "train/loss" in text and "train/lr" in text


def test_throughput_after_fit_measures_the_training_device_before_teardown(tmp_path, monkeypatch):
    """Lightning tears down (module to CPU) before on_fit_end: the fit measurement must run earlier, on
    trainer.strategy.root_device. A spy on the strategy's teardown shows the order; the record names the device."""
    x, y = learnable_batches(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    thr = ThroughputCallback(batch_size=2, warmup=1, iters=2, rounds=1, verbose=False, on_validate=False)
    events = []
    import tokenprune.bench as bench
    real = bench.compare_throughput

    def spy(models, *args, device=None, **kw):
        events.append(("measure", str(device), str(next(models["pruned"].parameters()).device)))
        return real(models, *args, device=device, **kw)

    monkeypatch.setattr(bench, "compare_throughput", spy)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[thr])
    teardown = trainer.strategy.teardown

    def spy_teardown():
        events.append(("teardown",))
        return teardown()

    monkeypatch.setattr(trainer.strategy, "teardown", spy_teardown)
    m = PruningClassifier("deit_test_patch4_32", "evit", 0.5, warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(m, loader)
    root = str(trainer.strategy.root_device)
    assert [e[0] for e in events] == ["measure", "teardown"]
    assert events[0][1:] == (root, root)
    assert thr.result["measured_on"] == root and thr.result["hook"] == "train_end"
    assert thr.result["device"] == root


# ---------------------------------------------------------------------------------------------- data stream
def _batches(loader, n=None):
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if n is not None and i + 1 == n:
            break
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_resumable_train_loader(tmp_path):
    shards = make_shards(tmp_path / "shards", train_sizes=(8, 8, 8), val_sizes=(4,))
    dm = ResumableShardDataModule(train_shards=shards["train_shards"], val_shards=shards["val_shards"],
                                  image_size=32, resize_size=32, batch_size=4, num_workers=0, shuffle_buffer=8,
                                  num_classes=10, mixup=0.0, cutmix=0.0, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableTrainLoader) and len(loader) == 6
    fake = types.SimpleNamespace(state=types.SimpleNamespace(fn=TrainerFn.FITTING), current_epoch=0,
                                 fit_loop=types.SimpleNamespace(epoch_loop=types.SimpleNamespace(
                                     batch_progress=types.SimpleNamespace(current=types.SimpleNamespace(ready=0)))))
    loader._trainer_ref = lambda: fake
    torch.manual_seed(1)
    epoch0 = _batches(loader)
    torch.manual_seed(12345)  # what the training step drew before does not matter
    torch.rand(100)
    assert _same(_batches(loader), epoch0)
    fake.current_epoch = 1
    epoch1 = _batches(loader)
    assert len(epoch1) == 6 and not _same(epoch1, epoch0)
    # resume in the middle of epoch 1: the first 4 batches were trained on
    fake.fit_loop.epoch_loop.batch_progress.current.ready = 4
    assert _same(_batches(loader), epoch1[4:])
    # without a trainer: epochs counted by iter()
    plain = ResumableTrainLoader(loader.factory, seed=3, rank=0)
    assert _same(_batches(plain), epoch0) and _same(_batches(plain), epoch1)
    assert _same(_batches(ResumableTrainLoader(loader.factory, seed=3, rank=0)), epoch0)
    assert not _same(_batches(ResumableTrainLoader(loader.factory, seed=4, rank=0)), epoch0)
