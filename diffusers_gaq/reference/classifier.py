"""The feature network behind FID-ref: a small CNN classifier for 32x32 Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..files import atomic_save_safetensors, atomic_write_text

FEATURE_DIM = 128


class FashionClassifier(nn.Module):
    """Three conv stages and a 128-d penultimate layer (the FID-ref features)."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.config = {"num_classes": num_classes, "feature_dim": feature_dim}

        def stage(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.backbone = nn.Sequential(stage(1, 16), stage(16, 32), stage(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(64, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], shape [N, 1, 32, 32] -> [N, feature_dim]."""
        return self.embed(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "config.json", json.dumps(self.config, indent=2))
        atomic_save_safetensors(self.state_dict(), directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "FashionClassifier":
        directory = Path(directory)
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()
