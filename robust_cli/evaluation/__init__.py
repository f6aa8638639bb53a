"""Layer 6: evaluating attacks on a model (robust accuracy, distances) and auditing the result."""
