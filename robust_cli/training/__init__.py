"""Layer 4: the one training loop (loop.py), validation during training and the published checkpoint (selection.py)."""
