"""Layer 1: running things and keeping files: errors, interrupts, engine, store, registry, models, data, batches."""
