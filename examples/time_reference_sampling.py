"""Time the reference pipeline: 1000 images at 50 DDIM steps (docs/reference.md).

    OMP_WAIT_POLICY=PASSIVE python examples/time_reference_sampling.py --threads 2
"""

import argparse

import torch

from diffusers_gaq.evaluation import generate
from diffusers_gaq.reference import load_reference_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    _, seconds = generate(load_reference_pipeline(), args.num_images, args.num_inference_steps, seed=0)
    print(f"{args.num_images} images x {args.num_inference_steps} DDIM steps: {seconds:.1f} s "
          f"({args.threads} threads, batch 250)")


if __name__ == "__main__":
    main()
