"""`robust export`: a checkpoint's weights as safetensors (or a bare .pt state dict) plus its config as JSON.

Exports are new files: an existing output is never replaced (one line says so). The weights load back with
`checkpoint=OUT.safetensors` in any robust command, with safetensors.torch.load_file elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

from robust_cli.commands import build
from robust_cli.core import registry, store
from robust_cli.core.errors import UserError

WRITES_RUN_DIR = False
NEEDS_COMMON_VALIDATION = False  # only the checkpoint is read: no dataset needed
FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}


def validate(cfg):
    if cfg.format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    source = build.published_checkpoint(cfg)
    registry.load_checkpoint(source)  # a missing or unreadable checkpoint: one line, before anything is written
    for path in outputs(cfg, source):
        if path.exists():
            raise UserError(f"'{path}' exists; robust export never replaces a file: remove it or give out=OTHER_PATH")


def outputs(cfg, source: Path) -> tuple[Path, Path]:
    base = Path(str(cfg.out)) if cfg.out else source.with_suffix("")
    if base.suffix in (".safetensors", ".pt", ".json"):
        base = base.with_suffix("")
    weights = base.with_name(base.name + FORMATS[cfg.format])
    if weights == source:
        weights = base.with_name(base.name + ".export" + FORMATS[cfg.format])
    return weights, weights.with_suffix(".json")


def run(cfg, ctx):
    source = build.published_checkpoint(cfg)
    state = registry.load_checkpoint(source)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["state_dict"].items()}
    weights, meta = outputs(cfg, source)
    if cfg.format == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise UserError("format=safetensors needs the safetensors package: pip install safetensors") from None
        blob = save(tensors, metadata={"format": "pt", "exported_by": "robust"})
        publish = lambda: store.atomic_write(weights, lambda f: f.write(blob), replace=False)
    else:
        publish = lambda: store.save_torch(weights, tensors, replace=False)
    try:  # new files only, decided when each is published: of two exports to one name started at once, one wins
        publish()
    except FileExistsError:
        raise UserError(f"'{weights}' was written by another process meanwhile; robust export never replaces a file: give out=OTHER_PATH") from None
    info = {
        "source": str(source),
        "weights": str(weights),
        "format": cfg.format,
        "config": state.get("config"),
        "identity": state.get("identity"),
        "epoch": state.get("epoch"),
        "versions": state.get("versions"),
        "environment": state.get("environment"),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "dtype": sorted({str(v.dtype) for v in tensors.values()}),
    }
    try:
        store.write_text(meta, json.dumps(info, indent=1, default=str) + "\n", replace=False)
    except FileExistsError:
        raise UserError(
            f"'{meta}' was written by another process meanwhile; the weights are in '{weights}', their description is not: give out=OTHER_PATH"
        ) from None
    store.results.print(
        f"wrote {weights} ({len(tensors)} tensors, {sum(v.numel() for v in tensors.values()):,} numbers) and {meta}", soft_wrap=True, highlight=False
    )
