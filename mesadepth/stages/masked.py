"""MeSa stage 1, masked pre-training: SimMIM on the Swin-v2 encoder (spec masked-pretraining sec. 1).

``mesadepth pretrain masked --config RECIPE [key=value ...]`` trains
:class:`~mesadepth.models.simmim.SimMIM` (the shared :class:`SwinV2Encoder` with its mask token,
a 1x1-conv + PixelShuffle decoder, L1 on masked pixels) on LSUN lmdb categories or image
folders, and writes into the run directory:

- ``config.yaml`` (the resolved recipe), ``checkpoints/last.ckpt`` (resume), ``logs/``;
- ``model.safetensors``: ``encoder.*`` (with ``encoder.mask_token``) and ``decoder.*`` — the
  hand-off to the geometric stage;
- ``figures/reconstruction.png``: input, masked input and reconstruction of fixed images;
- ``metrics.json``: the loss curve's start and end, images seen, wall time.

Learning rates in the recipe are per 512 images and scaled linearly by the total batch
(per-device batch x devices x nodes x accumulation), as SimMIM does (spec 1.7).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from mesadepth.config import save_config
from mesadepth.data.simmim_data import IMAGENET_MEAN, IMAGENET_STD, SimMIMDataset, SimMIMTransform
from mesadepth.errors import ConfigError
from mesadepth.models.backbone import SwinV2Encoder, build_encoder, save_encoder
from mesadepth.models.simmim import (
    MaskGenerator,
    SimMIM,
    SimMIMImportReport,
    load_simmim_checkpoint,
)
from mesadepth.optim import build_scheduler, param_groups_no_decay, scaled_lr
from mesadepth.training import (
    ResumableRandomSampler,
    TrainerConfig,
    fit,
    read_metrics,
    resolve_resume,
    write_metrics,
)


@dataclass
class EncoderConfig:
    """Which Swin-v2 to build (a preset of :data:`SWINV2_PRESETS` plus overrides) and its start."""

    preset: str = field(
        default="swinv2_large_window12_192",
        metadata={
            "help": "encoder preset (tiny-cpu, swinv2_base_window12_192, swinv2_large_window12_192, ...)"
        },
    )
    img_size: int | None = field(default=None, metadata={"help": "input size; null = the preset's"})
    window_size: int | None = field(
        default=None, metadata={"help": "attention window; null = the preset's"}
    )
    embed_dim: int | None = field(
        default=None, metadata={"help": "stage-0 width; null = the preset's"}
    )
    depths: list[int] | None = field(
        default=None, metadata={"help": "blocks per stage; null = the preset's"}
    )
    num_heads: list[int] | None = field(
        default=None, metadata={"help": "heads per stage; null = the preset's"}
    )
    drop_path_rate: float = field(
        default=0.1, metadata={"help": "stochastic depth, linear over blocks (Swin-v2 SimMIM: 0.1)"}
    )
    layer_norm_eps: float = field(
        default=1e-5,
        metadata={"help": "LayerNorm eps (1e-5: SimMIM / official Swin-v2; 1e-6: MIM-Depth)"},
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": "start from: encoder.* safetensors of a mesadepth run, or an official Swin-v2/SimMIM .pth; null = random"
        },
    )
    init_decoder: bool = field(
        default=True,
        metadata={
            "help": "with init: also load the file's SimMIM decoder (decoder.*) when it has one; "
            "false = a fresh decoder, as the reference does when a new run starts from a checkpoint"
        },
    )

    def overrides(self) -> dict[str, Any]:
        keys = ("img_size", "window_size", "embed_dim", "depths", "num_heads")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        for k in ("depths", "num_heads"):
            if k in out:
                out[k] = tuple(out[k])
        out["drop_path_rate"] = self.drop_path_rate
        out["layer_norm_eps"] = self.layer_norm_eps
        return out


@dataclass
class MaskedDataConfig:
    """Unlabelled images: LSUN lmdb categories or image folders (spec datasets sec. 1)."""

    format: Literal["lsun", "folder"] = field(
        default="lsun",
        metadata={
            "help": "lsun = <root>/<category>_train_lmdb; folder = <root>/<category>/**/*.jpg|png|webp"
        },
    )
    root: str = field(default="", metadata={"help": "dataset root folder"})
    categories: list[str] | None = field(
        default_factory=lambda: ["bedroom", "dining_room", "kitchen", "living_room"],
        metadata={"help": "LSUN categories / sub-folders (null: every sub-folder)"},
    )
    cap_per_category: int | None = field(
        default=None, metadata={"help": "images per category, drawn with data.seed (MeSa: 300000)"}
    )
    key_cache_dir: str | None = field(
        default=None, metadata={"help": "where LSUN key lists are cached (null: the run directory)"}
    )
    img_size: int = field(default=192, metadata={"help": "crop size fed to the encoder"})
    crop_scale: tuple[float, float] = field(
        default=(0.67, 1.0), metadata={"help": "RandomResizedCrop area range"}
    )
    crop_ratio: tuple[float, float] = field(
        default=(0.75, 4 / 3), metadata={"help": "RandomResizedCrop aspect range"}
    )
    batch_size: int = field(
        default=128, metadata={"help": "images per device and step (SimMIM: 128)"}
    )
    num_workers: int = field(default=8, metadata={"help": "DataLoader worker processes per device"})
    seed: int = field(
        default=0, metadata={"help": "seed of the subset draw, order and augmentation"}
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "corrupt images: stop, or skip and count"}
    )


@dataclass
class MaskConfig:
    patch_size: int = field(default=32, metadata={"help": "mask cell side in pixels (SimMIM: 32)"})
    ratio: float = field(
        default=0.6, metadata={"help": "masked share; ceil(cells x ratio) cells are masked"}
    )


@dataclass
class MaskedLossConfig:
    norm_target: bool = field(
        default=True, metadata={"help": "locally normalised target (Swin-v2 SimMIM recipe)"}
    )
    norm_target_patch_size: int = field(
        default=47, metadata={"help": "odd window of the target normalisation"}
    )


@dataclass
class MaskedOptimConfig:
    lr_per_512: float = field(
        default=1e-4, metadata={"help": "peak lr per 512 images (scaled by the total batch)"}
    )
    warmup_lr_per_512: float = field(
        default=5e-7, metadata={"help": "warm-up start lr per 512 images"}
    )
    min_lr_per_512: float = field(default=5e-6, metadata={"help": "cosine floor per 512 images"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW eps"})
    no_decay_rule: Literal["reference", "intended"] = field(
        default="reference",
        metadata={
            "help": "reference: SimMIM's effective rule; intended: also exempt cpb_mlp/logit_scale"
        },
    )
    warmup_epochs: float = field(default=10.0, metadata={"help": "linear warm-up length in epochs"})
    schedule: Literal["multistep", "cosine"] = field(
        default="multistep", metadata={"help": "after warm-up"}
    )
    milestones: list[float] = field(
        default_factory=lambda: [0.875],
        metadata={"help": "multistep drops as fractions of training (SimMIM: epoch 700 of 800)"},
    )
    gamma: float = field(default=0.1, metadata={"help": "multistep factor"})
    cosine_variant: Literal["simmim", "swin"] = field(
        default="swin", metadata={"help": "cosine over all steps (simmim) or after warm-up (swin)"}
    )


@dataclass
class MaskedRecipe:
    """Stage 1 of MeSa. Every key can be overridden on the command line as key=value."""

    run_dir: str = field(
        default="runs/masked",
        metadata={"help": "run directory (created; resumed if it holds checkpoints/last.ckpt)"},
    )
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: MaskedDataConfig = field(default_factory=MaskedDataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: MaskedLossConfig = field(default_factory=MaskedLossConfig)
    optim: MaskedOptimConfig = field(default_factory=MaskedOptimConfig)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(max_epochs=100, gradient_clip_val=5.0)
    )
    figures: int = field(default=4, metadata={"help": "images in figures/reconstruction.png"})


# ----------------------------------------------------------------------------- data


def image_dataset(cfg: MaskedDataConfig, run_dir: Path) -> Dataset:
    """The unlabelled image dataset of the recipe (LSUN lmdb or folders)."""
    from mesadepth.data.lsun import ImageFolderDataset, LSUNLmdb

    if not cfg.root:
        raise ConfigError(
            "data.root is not set: give the folder holding the LSUN lmdb folders or the images"
        )
    if cfg.format == "lsun":
        return LSUNLmdb(
            cfg.root,
            categories=tuple(cfg.categories or ()),
            cap_per_category=cfg.cap_per_category,
            seed=cfg.seed,
            key_cache_dir=cfg.key_cache_dir or str(run_dir / "lsun_keys"),
            on_error=cfg.on_error,
        )
    if cfg.cap_per_category is not None:
        raise ConfigError("data.cap_per_category applies to format=lsun only")
    return ImageFolderDataset(cfg.root, categories=cfg.categories, on_error=cfg.on_error)


class _EpochAwareDataset(SimMIMDataset):
    """Reads the epoch from the training sampler, which Lightning advances before each epoch;
    worker processes (re-created every epoch) copy the sampler with the current epoch."""

    sampler: ResumableRandomSampler | None = None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.sampler is not None:
            self.epoch = self.sampler.epoch
        return super().__getitem__(index)


def train_loader(recipe: MaskedRecipe, base: Dataset) -> DataLoader:
    """DataLoader of (image, mask) batches with a resumable, DDP-sharded order."""
    d = recipe.data
    mask = MaskGenerator(d.img_size, recipe.mask.patch_size, 4, recipe.mask.ratio)
    transform = SimMIMTransform(d.img_size, mask, d.crop_scale, d.crop_ratio)
    dataset = _EpochAwareDataset(base, transform, seed=d.seed)
    n = len(dataset)
    if n < d.batch_size:
        raise ConfigError(
            f"data: {n} images but data.batch_size={d.batch_size}; drop_last would leave no batch"
        )
    sampler = ResumableRandomSampler(n, seed=d.seed, drop_last=True)
    dataset.sampler = sampler
    return DataLoader(
        dataset,
        batch_size=d.batch_size,
        sampler=sampler,
        num_workers=d.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,  # SimMIM: full batches only
        persistent_workers=False,  # workers must be re-created to see the new epoch
    )


# ----------------------------------------------------------------------------- the module


def build_masked_encoder(cfg: EncoderConfig) -> SwinV2Encoder:
    """The encoder of the recipe, randomly initialised (``cfg.init`` is loaded into the whole
    SimMIM model by :class:`MaskedPretraining`, decoder included)."""
    return build_encoder(cfg.preset, **cfg.overrides())


class MaskedPretraining(L.LightningModule):
    """SimMIM as a LightningModule: AdamW with the no-decay rule, per-step warm-up schedule."""

    def __init__(self, recipe: MaskedRecipe) -> None:
        super().__init__()
        self.recipe = recipe
        # Plain dicts only: checkpoints stay loadable without executing pickled code.
        self.save_hyperparameters({"recipe": asdict(recipe)})
        encoder = build_masked_encoder(recipe.encoder)
        patch = encoder.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, tuple) else patch
        if patch != 4:
            raise ConfigError(f"encoder patch size {patch}: the SimMIM mask generator assumes 4")
        self.model = SimMIM(
            encoder,
            encoder_stride=32,
            norm_target=recipe.loss.norm_target,
            norm_target_patch_size=recipe.loss.norm_target_patch_size,
        )
        # What init loaded, re-initialised and dropped; run_masked prints it.
        self.init_report: SimMIMImportReport | None = None
        if recipe.encoder.init:
            self.init_report = load_simmim_checkpoint(
                recipe.encoder.init, self.model, decoder=recipe.encoder.init_decoder
            )
        self.first_losses: list[float] = []
        self.last_losses: list[float] = []

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(image, mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss, _ = self.model(batch["image"], batch["mask"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        value = float(loss.detach())
        if len(self.first_losses) < 10:
            self.first_losses.append(value)
        self.last_losses = (self.last_losses + [value])[-10:]
        return {"loss": loss, "terms": {"l1": loss.detach()}}

    def total_batch(self) -> int:
        t = self.trainer
        return self.recipe.data.batch_size * max(1, t.world_size) * t.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.recipe.optim
        total_batch = self.total_batch()
        lr = scaled_lr(o.lr_per_512, total_batch)
        groups = param_groups_no_decay(self.model, o.weight_decay, rule=o.no_decay_rule)
        for g in groups:
            g.pop("names", None)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=o.eps)
        total = int(self.trainer.estimated_stepping_batches)
        # estimated_stepping_batches has set up the loader, so the epoch length is known now.
        batches = self.trainer.num_training_batches
        accum = self.trainer.accumulate_grad_batches
        steps_per_epoch = max(1, math.ceil(batches / accum)) if math.isfinite(batches) else total
        warmup = int(round(o.warmup_epochs * steps_per_epoch))
        scheduler = build_scheduler(
            optimizer,
            total_iters=total,
            warmup_iters=min(warmup, total),
            warmup_lr=scaled_lr(o.warmup_lr_per_512, total_batch),
            kind=o.schedule,
            milestones=[int(round(f * total)) for f in o.milestones],
            gamma=o.gamma,
            min_lr=scaled_lr(o.min_lr_per_512, total_batch),
            cosine_variant=o.cosine_variant,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


# ----------------------------------------------------------------------------- figures and export


def reconstruction_figure(
    module: MaskedPretraining, dataset: SimMIMDataset, path: Path, n: int = 4
) -> None:
    """PNG of n fixed images: input, masked input, reconstruction (visible pixels pasted back)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mesadepth.models.simmim import mask_to_pixels

    saved_epoch = dataset.epoch
    dataset.epoch = 0
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    dataset.epoch = saved_epoch
    x = torch.stack([it["image"] for it in items]).to(module.device)
    m = torch.stack([it["mask"] for it in items]).to(module.device)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        _, rec = module.model(x, m)
        if module.model.norm_target:
            # The prediction is in locally normalised units: map it back with the input's stats.
            k = module.model.norm_target_patch_size
            mu = torch.nn.functional.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
            var = (
                torch.nn.functional.avg_pool2d(x * x, k, 1, k // 2, count_include_pad=False)
                - mu * mu
            ).clamp_min(0)
            rec = rec * torch.sqrt(var + 1e-6) + mu
    module.train(was_training)
    pix = mask_to_pixels(m, 4).float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)

    def show(t: torch.Tensor) -> np.ndarray:
        return (t * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    inp, masked = show(x), show(x * (1 - pix))
    recon = show(rec * pix + x * (1 - pix))
    fig, axes = plt.subplots(len(items), 3, figsize=(6, 2 * len(items)), squeeze=False)
    for r in range(len(items)):
        for c, (img, title) in enumerate(
            ((inp, "input"), (masked, "masked input"), (recon, "reconstruction"))
        ):
            axes[r, c].imshow(img[r])
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@rank_zero_only
def _print_rank_zero(line: str) -> None:
    print(line, flush=True)


def run_masked(
    recipe: MaskedRecipe,
    command: list[str] | None = None,
    resume: str = "auto",
    callbacks: tuple[L.Callback, ...] = (),
) -> dict[str, Any]:
    """Train stage 1 into ``recipe.run_dir``; returns the metrics written to metrics.json.

    ``callbacks`` are added to the trainer (progress reporting, or a test's simulated kill).
    """
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(recipe, run_dir / "config.yaml", command=command)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    base = image_dataset(recipe.data, run_dir)
    loader = train_loader(recipe, base)
    module = MaskedPretraining(recipe)
    resumed = resolve_resume(run_dir, resume) is not None
    if module.init_report is not None:
        note = " (the resumed checkpoint then replaces these weights)" if resumed else ""
        _print_rank_zero(module.init_report.summary() + note)
    previous = read_metrics(run_dir) if resumed else {}
    t0 = time.perf_counter()
    trainer = fit(module, loader, recipe.trainer, run_dir, resume=resume, callbacks=callbacks)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        encoder = module.model.encoder
        decoder = {f"decoder.{k}": v for k, v in module.model.decoder.state_dict().items()}
        save_encoder(
            encoder, run_dir / "model.safetensors", extra=decoder, metadata={"stage": "masked"}
        )
        reconstruction_figure(
            module, loader.dataset, run_dir / "figures" / "reconstruction.png", recipe.figures
        )
        first, last = module.first_losses, module.last_losses
        metrics = {
            "stage": "masked",
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "images_seen": int(trainer.global_step) * module.total_batch(),
            # A resumed run keeps the start of the curve its first part measured.
            "loss_start": previous.get(
                "loss_start", float(np.mean(first[:3])) if first else math.nan
            ),
            "loss_end": float(np.mean(last[-3:])) if last else math.nan,
            "train_seconds": round(seconds, 2),
            "images": len(base),  # type: ignore[arg-type]
        }
        if module.init_report is not None:
            metrics["init"] = previous.get("init", module.init_report.as_dict())
        write_metrics(run_dir, metrics)
    return metrics
