"""Your own image folder and your own torch trunk: simulate -> export -> predict, from Python.

    python examples/own_model_folder.py --out runs/example-own-model
    python examples/own_model_folder.py --images ~/my_photos --shape 3 32 32 --rounds 20

``--images`` is a folder with one sub-folder per class (``cats/``, ``dogs/``, ...); without
it the script first writes a small one of its own (three classes of 16x16 grey patterns), so
it runs anywhere. The trunk below is an ordinary ``torch.nn.Module``; registering it by name
is all the project needs to train it in the federation, export it into the bundle's ONNX
``trunk`` part and run it on a device with onnxruntime alone. Walkthrough: docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fedcoe_edge as fe
from export.bundle import build_bundle


class SmallConvTrunk(nn.Module):
    """(B, C, H, W) -> (B, width): two 3x3 convolutions, then a global average pool."""

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


def small_conv_trunk(input_shape: tuple[int, ...]) -> nn.Module:
    """The factory: called with the model's input shape (C, H, W) when a model is built."""
    return SmallConvTrunk(in_channels=input_shape[0])


def write_pattern_folder(root: Path, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    """Three classes of noisy grey 16x16 PNGs: horizontal stripes, vertical stripes, a blob."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for cls in ("hstripes", "vstripes", "blob"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = rng.integers(0, 4)
            if cls == "hstripes":
                img = ((yy + phase) // 2 % 2).astype(np.float64)
            elif cls == "vstripes":
                img = ((xx + phase) // 2 % 2).astype(np.float64)
            else:
                cy, cx = rng.integers(4, size - 4, 2)
                img = (((yy - cy) ** 2 + (xx - cx) ** 2) < 12).astype(np.float64)
            img = np.clip(img * 0.8 + rng.normal(0.1, 0.12, img.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8), "L").save(root / cls / f"{i:03d}.png")
    return root


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/example-own-model"))
    p.add_argument("--images", type=Path, default=None, help="folder/<class>/<image>; default: a generated one")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 16, 16], metavar=("C", "H", "W"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(args.shape)

    images = args.images or write_pattern_folder(args.out / "images")
    classes = fe.folder_classes(images)

    # 1. your trunk, by name (a TOML config would say trunk = "mypkg.models:small_conv_trunk")
    if "small_conv" not in fe.TRUNKS:
        fe.register_trunk("small_conv", small_conv_trunk)
    model = fe.ModelConfig(input_shape=shape, num_classes=len(classes), trunk="small_conv",
                           expert_kind="mlp", expert_hidden=16, num_global_experts=4, top_k=2)

    # 2. simulate a federation over the folder (clients get Dirichlet shares of it)
    cfg = fe.SimulationConfig(dataset=f"folder:{images}", image_shape=shape, partition="dirichlet",
                              alpha=1.0, clients=args.clients, new_clients=1, rounds=args.rounds,
                              algorithms=["fedcoe"], min_samples=8, model=model,
                              train=fe.TrainConfig(local_epochs=2, batch_size=16))
    doc, runs = fe.simulate(cfg, progress=False)
    metrics = doc["algorithms"]["fedcoe"]
    print(f"simulated {args.rounds} rounds: global {metrics['global_acc']:.3f}, "
          f"personalized {metrics['personalized_acc']:.3f}")

    # 3. export client 0's model (the global experts + its private level) as a bundle
    run = runs["fedcoe"][0]
    client = fe.client_model(run, "0")
    x_all, y_all = fe.load_dataset(f"folder:{images}", image_shape=shape)
    bundle = args.out / "bundle"
    manifest = build_bundle(client, bundle, calibration=x_all[:64], include_fused=False,
                            meta={"classes": classes, "client_id": "0"})
    print(f"bundle {bundle}: parts {', '.join(manifest['parts'])} "
          f"(trunk {manifest['model']['trunk']!r}, features {manifest['feat_shape']})")

    # 4. predict with onnxruntime + numpy (what a device runs; no torch, no registry needed)
    session = fe.MoESession(bundle)
    out = session.run(x_all)  # .probs: client 0's personal mixture; .global_probs: the fleet's
    acc_personal = float((out.probs.argmax(1) == y_all).mean())
    acc_global = float((out.global_probs.argmax(1) == y_all).mean())
    with torch.no_grad():
        torch_probs = client(torch.from_numpy(x_all)).log_probs.exp().numpy()
    agree = float((out.probs.argmax(1) == torch_probs.argmax(1)).mean())
    print(f"device runtime on all {len(y_all)} images: global path {acc_global:.3f}, client 0's "
          f"personal model {acc_personal:.3f} (tuned to its own share of the classes); top-1 "
          f"agreement with torch {agree:.3f}; first image -> {classes[int(out.probs[0].argmax())]}")
    result = {"global_acc": metrics["global_acc"], "personalized_acc": metrics["personalized_acc"],
              "runtime_global_acc": acc_global, "runtime_personal_acc": acc_personal,
              "agreement": agree, "parts": list(manifest["parts"]), "classes": classes,
              "bundle": str(bundle)}
    (args.out / "example.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except fe.FedCoEError as exc:  # bad input: one line, exit 2 (as the CLI does)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
