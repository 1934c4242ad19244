"""The FP model for the Fashion-MNIST bundle: a small ResNet-style CNN, trained once on CPU.

    python bench/studies/fashion_mnist/train_cnn.py                    # -> ~/.cache/moqe/fmnist_cnn
    python bench/studies/fashion_mnist/train_cnn.py --domains original inverted noise
                                                        # -> ~/.cache/moqe/fmnist_domains_cnn

trains the network (unless ``weights.safetensors`` is already there; ``--force`` retrains)
on the 60k Fashion-MNIST train images from the Debian ``dataset-fashion-mnist`` package and
writes into ``--out``:

- ``model.onnx``          the FP model for ``[model] source = "onnx"``: input ``(batch, 1, 28, 28)``
                          normalized as ``(pixel/255 - MEAN) / STD``, output ``(batch, 10)`` logits,
                          exported with ``moqe_compile.tasks.image.model.export_torch`` (symbolic batch);
- ``weights.safetensors`` the trained state dict;
- ``labels.txt``          the 10 class names, one per line;
- ``train.json``          epochs, wall time, test top-1 (torch and ONNX Runtime).

With ``--domains`` every train and test image is shown in its domain exactly as ``[data] source =
"fashion-mnist-domains"`` shows it (``moqe_compile.tasks.image.fashion_mnist.apply_domains``: the domain
fixed by the image's index), so the network is *trained* on the mixture of domains its bundle
(``moqe_compile/recipes/fmnist-domains.toml``) calibrates and tests on; random-crop padding repeats the border
pixels (the background of every domain) instead of writing black; ``train.json`` adds the test
top-1 per domain.

``moqe_compile/recipes/fmnist-cnn.toml`` builds a MoQE bundle from these files. The network is not part
of the ``moqe_compile`` package: it is a fixture for the statistically meaningful CV case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moqe_compile.tasks.image import fashion_mnist

# Train-set statistics of pixel/255 (0.28604, 0.35302), rounded; the fmnist-*.toml recipes use the same.
MEAN, STD = 0.286, 0.353
DEFAULT_OUT = Path("~/.cache/moqe/fmnist_cnn").expanduser()
DOMAINS_OUT = Path("~/.cache/moqe/fmnist_domains_cnn").expanduser()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class FashionResNet(nn.Module):
    """Stem 3x3 conv (32) at 28x28, then basic blocks 32 (/2), 64 (/2), 64: 152,362 parameters."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int] = (32, 64)):
        super().__init__()
        c1, c2 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(c1, c1, 2), BasicBlock(c1, c2, 2), BasicBlock(c2, c2, 1))
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2, replicate: bool = False) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding (in normalized units: the background of the
    original images; ``replicate``: the border pixels, the background of any domain) + h-flip."""
    B, _, H, W = x.shape
    bg = -MEAN / STD
    xp = (F.pad(x, (pad, pad, pad, pad), mode="replicate") if replicate
          else F.pad(x, (pad, pad, pad, pad), value=bg))
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    rows = (oy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(B)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(B, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def load_split(split: str, domains: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(uint8 images, labels, domain names or None) of "train" or "test", each image in its domain."""
    x, y = fashion_mnist.load(split)
    if not domains:
        return x, y, None
    x, names = fashion_mnist.apply_domains(x, np.arange(len(x)), domains, split)
    return x, y, names


def train(epochs: int = 8, batch: int = 256, max_lr: float = 4e-3, weight_decay: float = 0.05, seed: int = 0,
          threads: int = 2, domains: list[str] | None = None, log=print) -> tuple[FashionResNet, dict]:
    """Train on the 60k train images; report top-1 on the official 10k test set."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr, _ = load_split("train", domains)
    xte, yte, dte = load_split("test", domains)
    xtr = torch.from_numpy(fashion_mnist.normalize(xtr, MEAN, STD))
    xte = torch.from_numpy(fashion_mnist.normalize(xte, MEAN, STD))
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)

    model = FashionResNet().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=weight_decay)
    steps = (len(xtr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps,
                                                pct_start=0.25)
    t0, c0 = time.perf_counter(), time.process_time()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), batch):
            b = perm[i : i + batch]
            xb = _augment(xtr[b], gen, replicate=bool(domains)).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        acc = evaluate(model, xte, yte)
        history.append({"epoch": epoch, "train_loss": round(total / len(xtr), 4), "test_top1": acc,
                        "seconds": round(time.perf_counter() - t0, 1)})
        log(f"epoch {epoch}: train loss {total / len(xtr):.4f}  test top-1 {acc:.4f}  "
            f"({time.perf_counter() - t0:.0f} s)")
    model = model.to(memory_format=torch.contiguous_format).eval()
    info = {"arch": "FashionResNet", "params": sum(p.numel() for p in model.parameters()), "epochs": epochs,
            "batch_size": batch, "optimizer": "AdamW", "max_lr": max_lr, "weight_decay": weight_decay,
            "schedule": "OneCycle (pct_start 0.25)", "augmentation": "random crop (pad 2) + horizontal flip",
            "seed": seed, "threads": threads, "mean": MEAN, "std": STD,
            **({"domains": list(domains), "domain_rule": "domains[index % len(domains)] (fashion_mnist.apply_domains)",
                "noise_std": fashion_mnist.NOISE_STD, "blur_sigma": fashion_mnist.BLUR_SIGMA,
                "augmentation": "random crop (pad 2, border replicated) + horizontal flip"} if domains else {}),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1), "test_top1": history[-1]["test_top1"],
            "history": history}
    if domains:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xte[i : i + 1000]).argmax(1) for i in range(0, len(xte), 1000)]).numpy()
        info["test_top1_per_domain"] = {d: float((pred == yte.numpy())[dte == d].mean()) for d in domains}
    return model, info


def onnx_top1(path: Path, domains: list[str] | None = None) -> float:
    import onnxruntime as ort

    xte, yte, _ = load_split("test", domains)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = fashion_mnist.normalize(xte, MEAN, STD)
    pred = np.concatenate([sess.run(None, {name: x[i : i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == yte).mean())


def log(msg: str) -> None:
    print(f"[train_cnn] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output folder (default {DEFAULT_OUT}, with --domains {DOMAINS_OUT})")
    ap.add_argument("--domains", nargs="+", choices=fashion_mnist.DOMAINS, default=None,
                    help="train and test on these visible domains (as [data] source = 'fashion-mnist-domains')")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="retrain even if weights.safetensors exists")
    args = ap.parse_args(argv)
    from safetensors.torch import load_file, save_file

    from moqe_compile.tasks.image.model import export_torch

    out = (args.out or (DOMAINS_OUT if args.domains else DEFAULT_OUT)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    wpath, jpath = out / "weights.safetensors", out / "train.json"
    if wpath.is_file() and jpath.is_file() and not args.force:
        log(f"cached: {wpath}")
        model = FashionResNet()
        model.load_state_dict(load_file(str(wpath)))
        model.eval()
        info = json.loads(jpath.read_text())
        if info.get("domains") != args.domains and (info.get("domains") or args.domains):
            raise SystemExit(f"{jpath} was trained with domains = {info.get('domains')}, not {args.domains}; "
                             "pass --force to retrain or another --out")
    else:
        model, info = train(epochs=args.epochs, seed=args.seed, domains=args.domains, log=log)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wpath))
    (out / "labels.txt").write_text("\n".join(fashion_mnist.LABELS) + "\n")
    onnx_path = out / "model.onnx"
    if not onnx_path.is_file() or args.force or "onnx_test_top1" not in info:
        export_torch(model, onnx_path, fashion_mnist.IMAGE_SIZE, 18, channels=1)  # one self-contained file
        info["onnx_test_top1"] = onnx_top1(onnx_path, args.domains)
    jpath.write_text(json.dumps(info, indent=2))
    log(f"test top-1 {info['test_top1']:.4f} (ONNX Runtime {info['onnx_test_top1']:.4f}), "
        f"trained {info['epochs']} epochs in {info['train_seconds']} s -> {out}")
    print(onnx_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
