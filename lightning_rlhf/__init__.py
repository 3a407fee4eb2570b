"""lightning_rlhf: RLHF with PPO as a PyTorch Lightning module."""

__version__ = "0.1.0.dev0"
