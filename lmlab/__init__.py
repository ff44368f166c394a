"""lmlab: PyTorch Lightning + Hydra experiments for language models."""

__version__ = "0.1.0"
