"""robust: a Hydra-driven experiment runner for adversarial-robustness research."""

__version__ = "0.1.0"
