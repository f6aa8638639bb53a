"""Layer 5: the sources' measurements: persistence, boundary geometry, the discrete path kernel, certificates, analytic models."""
