"""Time 1000 reference samples at 50 DDIM steps (docs/reference.md): python examples/time_reference_sampling.py"""
import torch, time
torch.set_num_threads(2)
from diffusers_gaq.reference import load_reference_pipeline
from diffusers_gaq.evaluation import generate
p = load_reference_pipeline()
imgs, s = generate(p, 1000, 50, seed=0)
print("1000 images x 50 DDIM steps: %.1f s (2 threads, batch 250)" % s)
