"""VisionZip's fine-tuned variant: train the projector only, with the visual-token reducer in the loop.

Reduced tokens (merged contextual tokens above all) are out of the distribution the projector was trained
on; the paper fine-tunes the projector alone on a little caption data at the reduced budget. Here: a
Lightning module that freezes everything but `multi_modal_projector` and minimises the caption tokens'
cross-entropy, and a tiny built-in image-caption set (scikit-image photos, one hand-written caption each)
that exercises it offline. For real use pass a real caption set and the model's own tokenizer.

    python -m tokenprune.vlm.finetune --weights /data/llava-1.5-7b-hf --budget 64 --epochs 1 --out proj.pt
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .attach import ReducedVLM

CAPTIONS: Tuple[Tuple[str, str], ...] = (
    ("astronaut", "an astronaut in an orange suit in front of a flag and a space shuttle"),
    ("coffee", "a cup of coffee with latte art on a saucer"),
    ("chelsea", "a tabby cat looking to the side"),
    ("rocket", "a rocket standing on its launch pad"),
    ("hubble_deep_field", "many small galaxies in deep space"),
    ("immunohistochemistry", "a stained tissue sample under a microscope"),
)


class CharTokenizer:
    """A stand-in tokenizer for the random test models: one id per character, clear of the special ids."""

    def __init__(self, vocab_size: int, reserved: Sequence[int] = (), first: int = 3):
        self.ids = [i for i in range(first, vocab_size) if i not in set(reserved)]

    def __call__(self, text: str) -> List[int]:
        return [self.ids[ord(c) % len(self.ids)] for c in text]


class CaptionSet(Dataset):
    """(pixel_values (3, S, S), caption ids) of the built-in photos, preprocessed as LLaVA-1.5's CLIP processor."""

    def __init__(self, tokenize: Callable[[str], List[int]], image_size: int = 336,
                 captions: Sequence[Tuple[str, str]] = CAPTIONS):
        from skimage import data
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
        self.items = []
        for name, caption in captions:
            image = getattr(data, name)()
            if image.ndim == 2:
                image = image[..., None].repeat(3, -1)
            pixels = proc(images=image[..., :3], return_tensors="pt")["pixel_values"][0]
            self.items.append((pixels, torch.tensor(tokenize(caption), dtype=torch.long)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(image_token_id: int, n_placeholders: int, bos: int = 1, eos: int = 2, pad: int = 0):
    """Batch as the processor would: [BOS, <image> x n, caption, EOS], left padded."""
    def fn(batch):
        rows = [torch.cat([torch.tensor([bos]), torch.full((n_placeholders,), image_token_id), cap,
                           torch.tensor([eos])]) for _, cap in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack([p for p, _ in batch])}
    return fn


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Labels: the tokens after each row's last <image> placeholder; everything before, and padding, -100."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_image = torch.where(input_ids == image_token_id, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    return input_ids.masked_fill((pos <= last_image) | (attention_mask == 0), -100)


class ProjectorFinetune(L.LightningModule):
    """Caption loss through the reduced visual tokens; only the projector learns."""

    def __init__(self, reduced: ReducedVLM, lr: float = 2e-4):
        super().__init__()
        self.reduced, self.lr = reduced, lr
        projector = reduced.model.model.multi_modal_projector
        for p in reduced.model.parameters():
            p.requires_grad_(False)
        for p in projector.parameters():
            p.requires_grad_(True)
        self.projector = projector

    def loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        prepared = self.reduced.prepare(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        labels = caption_labels(prepared["input_ids"], prepared["attention_mask"],
                                self.reduced.model.config.image_token_id)
        return self.reduced.model(**prepared, labels=labels).loss

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.projector.parameters(), lr=self.lr)

    def train(self, mode: bool = True):  # the frozen tower and LLM stay in eval mode (no dropout)
        super().train(mode)
        self.reduced.model.eval()
        return self


def finetune(reduced: ReducedVLM, tokenize: Callable[[str], List[int]], epochs: int = 1, batch_size: int = 2,
             lr: float = 2e-4, captions: Sequence[Tuple[str, str]] = CAPTIONS, seed: int = 0,
             **trainer_kwargs) -> ProjectorFinetune:
    L.seed_everything(seed, verbose=False)
    cfg = reduced.model.config
    data = CaptionSet(tokenize, cfg.vision_config.image_size, captions)
    text = cfg.text_config
    loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                        collate_fn=collate(cfg.image_token_id, reduced.unreduced, bos=text.bos_token_id or 1,
                                           eos=text.eos_token_id or 2, pad=reduced.pad_token_id))
    module = ProjectorFinetune(reduced, lr)
    options = dict(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(trainer_kwargs)
    L.Trainer(**options).fit(module, loader)
    return module


def main(argv: Optional[List[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="local llava-hf LLaVA-1.5 directory (model + tokenizer)")
    ap.add_argument("--method", default="visionzip")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--out", default="projector.pt", help="the fine-tuned projector's state dict")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from .attach import load

    reduced = load(args.weights, args.method, args.budget)
    tok = AutoTokenizer.from_pretrained(args.weights, local_files_only=True)
    finetune(reduced, lambda s: tok(s, add_special_tokens=False)["input_ids"], args.epochs, lr=args.lr)
    torch.save(reduced.model.model.multi_modal_projector.state_dict(), args.out)
    print(f"projector written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
