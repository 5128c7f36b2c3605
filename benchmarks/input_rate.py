#!/usr/bin/env python
"""Input-pipeline rate: how many images per second one data-loader worker makes, and what the device side costs.

CPU side: ONE data-loader worker (``num_workers=1``, one torch thread, batches of 8 collated by
``pat_hf.data.collate_images``; the worker's start is not timed), through the public API, so decoding the stored
image is included on every side: a `datasets` image column of random RGB images
(300-500 px, JPEG-encoded; 32 px for the CIFAR-like pair), and the same augmentation recipe everywhere (RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25 ``pixel``, bilinear random-resized crop, flip). For each view pair
(student size / teacher size):

- ``timm``: timm's own single-view training transform (``create_transform``) at the larger of the two sizes,
  applied to the decoded image (float tensor, normalised, erased on the CPU): the reference;
- ``pat_hf``: ``with_image_transforms`` with both views, read the way the trainer reads it
  (``PerSampleSeededDataset``: every draw seeded per sample): one uint8 image at the larger size, plus the drawn
  erasing boxes;
- ``former``: what pat_hf did before (timm's full transform at the larger size, then each model's view resized
  and normalised per image on the CPU: two float32 tensors), for reference.

The three take turns pass by pass (a change in the machine's load hits them alike), best of ``--repeats`` passes,
on the same images. Bytes
per sample: what leaves the loader per sample (image tensors, erasing boxes, the label), per pixel of the larger
view (3 x H x W values).

Device side: the cost of making both models' views from a uint8 batch (``pat_hf.data.device.device_views``: resize,
normalisation, random erasing with its per-box fills) per batch, on the CPU (``--device-threads`` threads) and,
when a GPU is present, on the GPU (batch ``--gpu-batch``, CUDA-synchronised).

    python benchmarks/input_rate.py                       # all pairs, ~2 min on one core
    python benchmarks/input_rate.py --pairs 224/256 --images 64 --repeats 3 --json outputs/input_rate.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

import numpy as np
import torch

PAIRS = ("224/224", "224/256", "224/384", "32->224")
RECIPE = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "train_interpolation": "bilinear",
}
STUDENT_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
TEACHER_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # another normalisation, as a ViT teacher's


def make_dataset(n: int, small: bool, seed: int = 0):
    """``n`` random RGB images stored as JPEG in a `datasets` Image column (32 px when ``small``, else
    300-500 px a side)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = (32, 32) if small else tuple(int(v) for v in rng.integers(300, 501, 2))
        # Smooth random images (JPEG sizes close to photos'), not white noise.
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
        arr = np.clip(arr.astype(np.int16) + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]}, features=features)


def parse_pair(pair: str) -> tuple[int, int, bool]:
    """``"224/256"`` -> (student 224, teacher 256, large images); ``"32->224"`` -> (224, 224, 32 px images)."""
    if "->" in pair:
        return int(pair.split("->")[1]), int(pair.split("->")[1]), True
    s, t = pair.split("/")
    return int(s), int(t), False


def nbytes(batch: dict) -> int:
    """Bytes of a collated batch's arrays (images, erasing boxes, labels)."""
    return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else v.nbytes for v in batch.values())


class TimmSide(torch.utils.data.Dataset):
    """timm's single-view transform on the decoded image (``former``: then both views per image, as pat_hf did)."""

    def __init__(self, encoded, decoder, transform, views=None) -> None:
        self.encoded, self.decoder, self.transform, self.views = encoded, decoder, transform, views

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        from pat_hf.data.views import convert_view

        x = self.transform(self.decoder.decode_example(self.encoded[i]).convert("RGB"))
        if self.views is None:
            return {"pixel_values": x, "labels": i % 10}
        base, student, teacher = self.views
        return {
            "pixel_values": convert_view(x[None], base, student)[0],
            "teacher_pixel_values": convert_view(x[None], base, teacher)[0],
            "labels": i % 10,
        }


def timed_passes(datasets: dict, repeats: int, batch_size: int = 8) -> tuple[dict, dict]:
    """Best time of ``repeats`` passes over each dataset through ONE data-loader worker each (persistent; a
    warm-up pass first, so the worker's start is not counted). The sides take turns pass by pass, so a change in
    the machine's load hits them alike. Returns the best times and one batch of each (for its size)."""
    from pat_hf.data.datasets import collate_images

    loaders = {
        name: torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=1,
            persistent_workers=True,
            prefetch_factor=4,
            collate_fn=collate_images,
        )
        for name, dataset in datasets.items()
    }
    batches = {name: next(iter(loader)) for name, loader in loaders.items()}  # starts the workers
    best = dict.fromkeys(loaders, float("inf"))
    for _ in range(repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _batch in loader:
                pass
            best[name] = min(best[name], time.perf_counter() - start)
    return best, batches


def cpu_side(pair: str, n: int, repeats: int) -> dict:
    from timm.data import create_transform

    from pat_hf import ImageView, with_image_transforms
    from pat_hf.data.datasets import PerSampleSeededDataset

    s, t, small = parse_pair(pair)
    student = ImageView(size=(s, s), **STUDENT_STATS)
    teacher = ImageView(size=(t, t), **TEACHER_STATS)
    base = max(s, t)
    data = make_dataset(n, small)
    decoder = data.features["image"]
    raw = data.cast_column("image", type(decoder)(decode=False)).with_format(None)
    encoded = [raw[i]["image"] for i in range(n)]
    timm_tf = create_transform(
        input_size=(3, base, base),
        is_training=True,
        auto_augment=RECIPE["auto_augment"],
        re_prob=RECIPE["re_prob"],
        re_mode=RECIPE["re_mode"],
        interpolation=RECIPE["train_interpolation"],
        **STUDENT_STATS,
    )
    base_view = ImageView(size=(base, base), **STUDENT_STATS)
    sides = {
        "timm": TimmSide(encoded, decoder, timm_tf),
        # What the trainer reads: every draw seeded per sample.
        "pat_hf": PerSampleSeededDataset(with_image_transforms(data, student, teacher, train=True, **RECIPE), 0),
        "former": TimmSide(encoded, decoder, timm_tf, views=(base_view, student, teacher)),
    }
    best, batches = timed_passes(sides, repeats)
    pixels = 3 * base * base
    batch_size = len(batches["timm"]["labels"])
    return {
        "pair": pair,
        "base": base,
        "images": n,
        **{f"{k}_img_s": n / v for k, v in best.items()},
        "ratio_vs_timm": best["timm"] / best["pat_hf"],
        "former_ratio_vs_timm": best["timm"] / best["former"],
        **{f"{k}_bytes_per_pixel": nbytes(b) / len(b["labels"]) / pixels for k, b in batches.items()},
        "pat_hf_image_bytes_per_pixel": batches["pat_hf"]["pixel_values"][0].numel() / pixels,
        "batch_size": batch_size,
    }


def device_side(pair: str, batch: int, device: str, repeats: int = 5) -> dict:
    from pat_hf import ImageView
    from pat_hf.data.augment import AugmentationConfig, draw_erasing
    from pat_hf.data.device import device_views

    s, t, _ = parse_pair(pair)
    student = ImageView(size=(s, s), **STUDENT_STATS)
    teacher = ImageView(size=(t, t), **TEACHER_STATS)
    base = max(s, t)
    images = torch.randint(0, 256, (batch, 3, base, base), dtype=torch.uint8)
    config = AugmentationConfig(**RECIPE)
    # As collated: the boxes a NumPy array on the host, the images pinned when a GPU takes them.
    erase = np.stack([draw_erasing(config, (base, base)).numpy() for _ in range(batch)])
    if device == "cuda":
        images = images.pin_memory()

    def step(with_erase: bool) -> None:
        x = images.to(device, non_blocking=True)
        device_views(x, student, teacher, erase if with_erase else None)

    result = {"pair": pair, "device": device, "batch": batch}
    for with_erase in (False, True):
        step(with_erase)  # warm-up
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(with_erase)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        key = "erasing" if with_erase else "plain"
        result[f"{key}_ms_per_batch"] = 1000 * min(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS))
    parser.add_argument("--images", type=int, default=96, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best kept)")
    parser.add_argument("--cpu-batch", type=int, default=32)
    parser.add_argument("--device-threads", type=int, default=1, help="torch threads for the device side on the CPU")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--skip-cpu-side", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one data-loader worker's share
    import PIL
    import timm

    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"Pillow {PIL.__version__}; {args.images} images per run, best of {args.repeats}"
    )
    results = {"cpu_side": [], "device_side": []}
    if not args.skip_cpu_side:
        print(
            "\n| views (student/teacher) | timm 1 view, img/s | pat_hf, img/s | vs timm | former, img/s | vs timm "
            "| bytes/px pat_hf (image only) | timm | former |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for pair in args.pairs:
            r = cpu_side(pair, args.images, args.repeats)
            results["cpu_side"].append(r)
            print(
                f"| {pair} | {r['timm_img_s']:.0f} | {r['pat_hf_img_s']:.0f} | {r['ratio_vs_timm']:.2f} "
                f"| {r['former_img_s']:.0f} | {r['former_ratio_vs_timm']:.2f} "
                f"| {r['pat_hf_bytes_per_pixel']:.4f} ({r['pat_hf_image_bytes_per_pixel']:.2f}) "
                f"| {r['timm_bytes_per_pixel']:.2f} | {r['former_bytes_per_pixel']:.2f} |",
                flush=True,
            )
    devices = [("cpu", args.cpu_batch)] + ([("cuda", args.gpu_batch)] if torch.cuda.is_available() else [])
    torch.set_num_threads(args.device_threads)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(
        f"\nDevice side (both views from one uint8 batch; CPU with {args.device_threads} thread(s)"
        + (f"; GPU {name}" if name else "; no GPU here")
        + ")"
    )
    print("\n| views | device | batch | ms/batch | ms/batch with erasing | µs/image with erasing |")
    print("|---|---|---|---|---|---|")
    for device, batch in devices:
        for pair in args.pairs:
            r = device_side(pair, batch, device)
            results["device_side"].append(r)
            print(
                f"| {pair} | {device} | {batch} | {r['plain_ms_per_batch']:.1f} | {r['erasing_ms_per_batch']:.1f} "
                f"| {1000 * r['erasing_ms_per_batch'] / batch:.0f} |",
                flush=True,
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(results, gpu=name), f, indent=2)


if __name__ == "__main__":
    main()
