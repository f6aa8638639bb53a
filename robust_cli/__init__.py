"""robust: a Hydra-driven experiment runner for adversarial-robustness research.

The package is built in layers; a module imports only from its own layer or the layers listed before it
(tests/test_structure.py checks this, and that no import circle exists):

1. `core/`        running things and keeping files: errors, interrupts, engine (device, precision), store (run
                  directories, atomic writes), registry (checkpoints), models, data (datasets), batches
2. `attacks/`     one attack per class, one call signature: attack(model, x, y) -> adversarial examples
3. `defenses/`    training objectives: loss, stats = defense(model, x, y)
4. `training/`    the one training loop, validation and checkpoint selection
5. `analysis/`    the sources' measurements: persistence, boundary geometry, the path kernel and its training path,
                  certificates, analytic models
6. `evaluation/`  evaluating attacks on a model, and auditing the result
7. `results/`     collecting runs into tables, reports, paper tables, tracking callbacks
8. `commands/`    one module per `robust <command>`; `build` turns the composed config into plain objects, once;
                  `checks` validates a job before any work; `usage` writes the help
9. `cli.py`       composes the config, runs the command in its run directory, writes run.json

Below `commands/`, functions take the values they use, never the composed config.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# modules that lived at the package's top level until 0.1.0; the old paths still import (users' notebooks use them)
MOVED = {
    "errors": "core.errors",
    "interrupts": "core.interrupts",
    "engine": "core.engine",
    "store": "core.store",
    "registry": "core.registry",
    "models": "core.models",
    "data": "core.data",
    "train": "training.loop",
    "selection": "training.selection",
    "persistence": "analysis.persistence",
    "boundary": "analysis.boundary",
    "kernel": "analysis.kernel",
    "certify": "analysis.certify",
    "analytic": "analysis.analytic",
    "geometry_objects": "analysis.geometry_objects",
    "evaluate": "evaluation.evaluate",
    "audit": "evaluation.audit",
    "collect": "results.collect",
    "report": "results.report",
    "paper_tables": "results.paper_tables",
    "callbacks": "results.callbacks",
}


def historical_name(dotted: str) -> str:
    """`robust_cli.core.models.MLP` -> `robust_cli.models.MLP`: the name before the move, so that checkpoint keys
    (which hash the config's `_target_` strings) stay what they were."""
    for old, new in MOVED.items():
        prefix = f"{__name__}.{new}"
        if dotted == prefix or dotted.startswith(prefix + "."):
            return f"{__name__}.{old}" + dotted[len(prefix) :]
    return dotted


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `robust_cli.<old>` as the module at its new path (the same module object), with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path will be removed in 0.3)", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module ran at its new path


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
