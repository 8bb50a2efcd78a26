"""Train the packaged digits models of `diffsampler.eval.digits` on CPU, offline.

1. An epsilon-prediction diffusers `UNet2DModel` (16x16, 1 channel, ~0.95M parameters, attention
   in the lowest 4x4 block) with `DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")`
   on the train split of scikit-learn's digits (no augmentation); AdamW with linear warm-up and
   cosine decay, gradient clipping, an EMA of the weights (the EMA weights are saved).  Saved as a
   `DDPMPipeline` (safetensors, float32) in OUT/ddpm.
2. A small CNN `DigitsClassifier` (tiny +-1 px shifts as augmentation), saved in OUT/classifier.

Deterministic for a given --seed and --threads.  The packaged assets were built with
`--threads 1` (on a shared 2-core machine one thread ran 3x faster than two): 3000 steps in 24 min at
~0.5 s/step; on an idle machine a step takes ~0.2 s with 2 threads.  OUT/train_log.json records
what was run, the loss curve and the classifier's accuracy.

    python scripts/train_digits.py                      # writes diffsampler/assets/digits/
    python scripts/train_digits.py --out /tmp/digits --steps 500
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup

from diffsampler.eval.digits import ASSET_DIR, DigitsClassifier, digits_dataset


def build_unet(size: int) -> UNet2DModel:
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 48, 64), norm_num_groups=16, attention_head_dim=32,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_ddpm(args, x: torch.Tensor, log: dict) -> DDPMPipeline:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    unet = build_unet(args.size)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    acp = scheduler.alphas_cumprod.float()
    print(f"[ddpm] UNet2DModel {n_params(unet):,} parameters, {len(x)} training images, "
          f"{args.steps} steps of batch {args.batch}, lr {args.lr}, EMA {args.ema}", flush=True)

    perm, pos = torch.randperm(len(x), generator=gen), 0
    t0, window, curve = time.time(), [], []
    unet.train()
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(x):  # epoch-wise shuffling, drop the ragged tail
            perm, pos = torch.randperm(len(x), generator=gen), 0
        x0 = x[perm[pos:pos + args.batch]]
        pos += args.batch
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t0
            mean = sum(window) / len(window)
            curve.append([step, round(mean, 5)])
            window = []
            print(f"[ddpm] step {step:5d}/{args.steps}  loss {mean:.4f}  lr {lr_sched.get_last_lr()[0]:.2e}  "
                  f"{step / el:.2f} it/s  {el / 60:.1f} min", flush=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            _save_pipeline(ema, scheduler, args.out / "ddpm")
    log["ddpm"] = {"parameters": n_params(unet), "steps": args.steps, "batch": args.batch, "lr": args.lr,
                   "warmup": args.warmup, "weight_decay": args.weight_decay, "ema": args.ema,
                   "train_seconds": round(time.time() - t0, 1), "loss_curve": curve,
                   "final_loss": curve[-1][1]}
    return _save_pipeline(ema, scheduler, args.out / "ddpm")


def _save_pipeline(unet, scheduler, path: Path) -> DDPMPipeline:
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer shifts of up to max_shift pixels, background (-1) filled."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * p)
    xr = xp.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 1, h, w)
    return xr.gather(3, cols)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train_classifier(args, log: dict) -> DigitsClassifier:
    x, y = digits_dataset("train", args.size)
    xt, yt = digits_dataset("test", args.size)
    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = DigitsClassifier(size=args.size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch, epochs = 64, args.classifier_epochs
    steps = epochs * (len(x) // batch)
    lr_sched = get_cosine_schedule_with_warmup(opt, 50, steps)
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        perm, tot = torch.randperm(len(x), generator=gen), 0.0
        for i in range(len(x) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(_shift(x[idx], gen, 1)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            tot += loss.item()
        if epoch % 5 == 0 or epoch == epochs:
            print(f"[classifier] epoch {epoch:3d}/{epochs}  loss {tot / (len(x) // batch):.4f}  "
                  f"train acc {accuracy(model, x, y):.4f}  test acc {accuracy(model, xt, yt):.4f}", flush=True)
    acc = accuracy(model, xt, yt)
    log["classifier"] = {"parameters": n_params(model), "epochs": epochs, "train_accuracy": accuracy(model, x, y),
                         "test_accuracy": acc, "train_seconds": round(time.time() - t0, 1)}
    model.save_pretrained(args.out / "classifier")
    print(f"[classifier] held-out accuracy {acc:.4f} ({len(xt)} images), saved to {args.out / 'classifier'}",
          flush=True)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSET_DIR, help=f"output directory (default: {ASSET_DIR})")
    p.add_argument("--steps", type=int, default=3000, help="DDPM training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=16, help="image size (the 8x8 digits are upsampled)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--only", choices=("ddpm", "classifier"), help="train only one of the two models")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="save the EMA pipeline every N steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log.update({"command": " ".join(["python scripts/train_digits.py", *(argv if argv is not None else sys.argv[1:])]),
                "seed": args.seed, "size": args.size,
                "threads": args.threads, "torch": torch.__version__})
    t0 = time.time()
    if args.only != "classifier":
        x, _ = digits_dataset("train", args.size)
        train_ddpm(args, x, log)
        print(f"[ddpm] saved EMA pipeline to {args.out / 'ddpm'}", flush=True)
    if args.only != "ddpm":
        train_classifier(args, log)
    text = json.dumps(log, indent=1)
    text = re.sub(r"\[\s+(\d+),\s+([-\d.e]+)\s+\]", r"[\1, \2]", text)  # one [step, loss] pair a line
    log_path.write_text(text + "\n")
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
