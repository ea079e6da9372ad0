"""Retrain the embedded reference models from scratch on Fashion-MNIST.

    python -m diffusers_gaq.reference.train all --out diffusers_gaq/reference/assets

``unet`` trains the DDPM (epsilon prediction, linear betas, EMA weights) and writes a
DDIMPipeline folder; ``classifier`` trains the FID-ref feature network and writes the
feature statistics of the real test split beside it. Snapshots are written atomically
while training, so an interrupted run leaves a usable pipeline behind.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from ..files import atomic_directory, atomic_path, atomic_write_text
from .classifier import FashionClassifier
from .data import load_fashion_mnist, to_model_range
from .recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

logger = logging.getLogger(__name__)


def save_pipeline(unet: UNet2DModel, out: Path, meta: dict) -> None:
    with atomic_directory(out) as tmp:
        DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG)).save_pretrained(tmp)
        atomic_write_text(tmp / "training.json", json.dumps(meta, indent=2))


def train_unet(out: Path, steps: int, batch_size: int, lr: float, ema_decay: float, seed: int,
               snapshot_every: int, log_every: int = 50, stop_after: int | None = None) -> None:
    """``steps`` sets the learning-rate schedule; ``stop_after`` ends training early on that schedule
    (the shipped model is such a snapshot: same command, deterministic data order)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, _ = load_fashion_mnist("train")
    data = torch.from_numpy(to_model_range(images))
    unet = UNet2DModel(**REFERENCE_UNET_CONFIG)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(500, steps // 10)

    def lr_at(step):  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    n_params = sum(p.numel() for p in unet.parameters())
    logger.info("UNet: %d parameters; %d steps at batch %d", n_params, steps, batch_size)
    start, running = time.time(), 0.0
    last = min(steps, stop_after or steps)
    for step in range(last):
        idx = torch.from_numpy(rng.integers(0, len(data), batch_size))
        x0 = data[idx]
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        xt = noise_scheduler.add_noise(x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % log_every == 0:
            elapsed = time.time() - start
            logger.info("step %d/%d loss %.4f lr %.2e %.1f min", step + 1, steps, running / log_every, lr_at(step), elapsed / 60)
            running = 0.0
        if (step + 1) % snapshot_every == 0 or step + 1 == last:
            meta = dict(steps=step + 1, total_steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                        seed=seed, wall_minutes=round((time.time() - start) / 60, 1), parameters=n_params,
                        threads=torch.get_num_threads())
            save_pipeline(ema, out, meta)
            logger.info("snapshot at step %d -> %s", step + 1, out)


@torch.no_grad()
def feature_statistics(model: FashionClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    feats = torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def train_classifier(out: Path, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    from safetensors.numpy import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, xte = torch.from_numpy(to_model_range(xtr)), torch.from_numpy(to_model_range(xte))
    ytr, yte = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * (len(xtr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(xtr)))
        for i in range(len(xtr) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = xtr[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = sum((model(xte[i : i + 1000]).argmax(1) == yte[i : i + 1000]).sum().item() for i in range(0, len(xte), 1000)) / len(xte)
        logger.info("classifier epoch %d/%d test accuracy %.4f", epoch + 1, epochs, acc)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    mu, sigma = feature_statistics(model, xte)
    with atomic_path(out / "fid_stats_test.safetensors") as tmp:
        save_file({"mu": mu, "sigma": sigma}, str(tmp))
    atomic_write_text(out / "training.json", json.dumps(dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                                             test_accuracy=acc), indent=2))
    return acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["unet", "classifier", "all"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "assets")
    p.add_argument("--steps", type=int, default=5000, help="length of the learning-rate schedule")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps of the schedule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--snapshot-every", type=int, default=500)
    # The shipped models were trained with --threads 1 (two processes side by side on 2 cores).
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what in ("classifier", "all"):
        acc = train_classifier(args.out / "classifier", args.classifier_epochs, 128, 3e-3, args.seed)
        logger.info("classifier test accuracy %.4f", acc)
    if args.what in ("unet", "all"):
        train_unet(args.out / "pipeline", args.steps, args.batch_size, args.lr, args.ema_decay, args.seed, args.snapshot_every,
                   stop_after=args.stop_after)


if __name__ == "__main__":
    main()
