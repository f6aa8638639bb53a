"""One module per `robust <command>` (its `run(cfg, ctx)` and checks), plus what they share: `build` turns the
composed config into plain objects, `checks` validates a job before any work, `usage` writes the help texts."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
COMMANDS = {
    "train": "train a model under a defense and save a checkpoint",
    "attack": "attack the trained model: accuracy-vs-eps curve or minimal distances",
    "persistence": "gamma-persistence of natural vs adversarial points (Bell)",
    "kernel": "exact discrete-path-kernel representation of a gradient-trained net",
    "boundary": "decision-boundary points, projections and local dimension",
    "certify": "randomized-smoothing certificates (Cohen) beside persistence and attacks",
    "ledger": "the per-example worst case over every attack run on each model; import and export adversarial examples",
    "collect": "merge the CSVs of many runs into one table per kind",
    "report": "one self-contained report.html of collected runs: tables, figures, audits, failures",
    "info": "print the composed config and the checkpoint it would use",
    "export": "write a checkpoint as safetensors (or a bare .pt) plus a JSON of its config",
}
GROUPS = ("model", "dataset", "defense", "attack", "optimizer", "scheduler", "search", "experiment")
USAGE_GROUPS = GROUPS + ("hydra/launcher", "hydra/callbacks")  # also listed by --help (Hydra's own launcher group is `basic`)
