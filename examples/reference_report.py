"""Measure the embedded reference pipeline for docs/reference.md.

    python examples/reference_report.py --num-images 1000 --num-inference-steps 50

Prints: sampling wall time, FID-ref of the generated images, the FID-ref floor (real train
images against the test statistics, at the same count and on the whole split), the classifier's
test accuracy; writes the sample grid to docs/reference_samples.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_gaq.evaluation import fid_reference, generate, image_grid  # noqa: E402
from diffusers_gaq.reference import PIPELINE_DIR, load_reference_classifier, load_reference_pipeline  # noqa: E402
from diffusers_gaq.reference.data import load_fashion_mnist, to_model_range  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default=str(ROOT / "docs" / "reference_samples.png"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_reference_pipeline()
    images, seconds = generate(pipe, args.num_images, args.num_inference_steps, seed=0)
    fid = fid_reference(images)
    image_grid(images[:100], nrow=10).resize((10 * 34 * 2 + 4, 10 * 34 * 2 + 4), 0).save(args.grid)

    train, _ = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    to01 = lambda x: (to_model_range(x)[:, 0] + 1) / 2  # noqa: E731
    floor_n = fid_reference(to01(train[rng.choice(len(train), args.num_images, replace=False)]))
    floor_all = fid_reference(to01(train))

    test, labels = load_fashion_mnist("test")
    clf = load_reference_classifier()
    with torch.no_grad():
        x = torch.from_numpy(to_model_range(test))
        pred = torch.cat([clf(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)]).numpy()
    acc = float((pred == labels).mean())

    training = json.loads((PIPELINE_DIR / "training.json").read_text())
    result = {
        "sampling_seconds": round(seconds, 1),
        "num_images": args.num_images,
        "num_inference_steps": args.num_inference_steps,
        "fid_ref": round(fid, 3),
        "fid_ref_floor_train_same_count": round(floor_n, 3),
        "fid_ref_floor_train_60k": round(floor_all, 3),
        "classifier_test_accuracy": round(acc, 4),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "training": training,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
