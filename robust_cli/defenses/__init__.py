"""Training objectives: each is a callable `(model, x, y) -> (loss, stats)`."""
from robust_cli.defenses.standard import CrossEntropy

__all__ = ["CrossEntropy"]
