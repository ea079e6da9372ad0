"""``ClassConditionalDDIMPipeline``: sampling for a class-conditional ``UNet2DModel``.

diffusers ships no pipeline that passes class labels to a ``UNet2DModel`` (DDIMPipeline and
DDPMPipeline call ``unet(x, t)``), so a class-conditional UNet, full precision or quantized, is
sampled with this one: DDIMPipeline's loop with ``class_labels`` passed to the UNet.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDIMPipeline(DiffusionPipeline):
    """``unet``: a class-conditional UNet2DModel (``num_class_embeds`` or ``class_embed_type``);
    ``scheduler``: any diffusers scheduler (DDIM, DDPM, ...)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, num_inference_steps: int = 50, eta: float = 0.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """One image per entry of ``class_labels``; ``output_type`` "pil", "np" or "pt" (images in [0, 1])."""
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        image = randn_tensor((len(labels), self.unet.config.in_channels, h, w), generator=generator,
                             device=self.device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(image, t)
            eps = self.unet(model_input, t, class_labels=labels).sample
            image = self.scheduler.step(eps, t, image, **step_kwargs).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


__all__ = ["ClassConditionalDDIMPipeline"]
