"""How models run: device, precision, compilation, memory layout, batch sizes that fit, data placement.

One place, used by train, attack and persistence (boundary, kernel and certify compute exact geometry and
certificates and always run the fp32 eager model). Commands build an `Engine` from their config at the boundary
and pass it down; nothing below reads `cfg`.

- `precision`: fp32 | bf16 | fp16 (torch.autocast); `auto` is bf16 on a CUDA device that supports it, else fp32.
  Reduced precision only ever runs inside `FastModel`; every decision that is reported (is an example broken,
  which class does a noisy sample fall in for the final counts) is taken by `exact(model)`, the fp32 eager model.
- `compile`: torch.compile once per model and process, reused by every attack and eps; a compile failure falls
  back to eager with one warning.
- `channels_last`: NHWC layout for conv nets on CUDA (`auto`), where cuDNN's fast kernels want it.
- `BatchSize`: an integer, or `auto`: start large and halve on a CUDA out-of-memory error, remembering the size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from robust_cli.core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_BATCH_START = {"cuda": 8192, "cpu": 256}  # examples per attack call; CPU: no out-of-memory signal (the OS kills instead)
AUTO_SAMPLE_START = {"cuda": 65536, "cpu": 1024}  # noisy samples per model call (persistence, certify)


def resolve_precision(spec, device: torch.device) -> tuple[str, str]:
    """(precision, why) for the setting `precision=spec` on `device`."""
    spec = str(spec)
    if spec not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec != "auto":
        if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"precision=bf16 but {torch.cuda.get_device_name(device)} does not support bfloat16; use precision=fp16 or fp32")
        return spec, "set"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", "auto: CUDA device with bfloat16"
    return "fp32", f"auto: {device.type}" + (" without bfloat16" if device.type == "cuda" else "")


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class FastModel(nn.Module):
    """The model as attacks and training run it: under autocast, compiled, channels_last; logits come back fp32.

    It shares its parameters with `exact` (the fp32 eager model), so training it trains that one; `exact(m)` is
    what judges adversarial examples."""

    def __init__(self, model: nn.Module, precision: str, device_type: str, compiled: bool, channels_last: bool, warn=None):
        super().__init__()
        self.exact = model
        self.precision, self.device_type, self.channels_last = precision, device_type, channels_last
        self._warn = warn or (lambda message: None)
        self._compiled = None
        if compiled:
            try:
                self._compiled = torch.compile(model)
            except Exception as exc:  # noqa: BLE001 - e.g. no compiler backend for this platform: eager still works
                self._fall_back(exc)

    def _fall_back(self, exc) -> None:
        self._compiled = None
        self._warn(f"compile=true: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); running eager")

    def _run(self, x):
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - compilation happens on the first call (and on new shapes)
                self._fall_back(exc)
        return self.exact(x)

    def forward(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            return self._run(x)
        with torch.autocast(self.device_type, dtype=AUTOCAST_DTYPES[self.precision]):
            out = self._run(x)
        return out.float()

    def regularization(self):
        return self.exact.regularization()

    def __getattr__(self, name):  # attributes of the wrapped model (a defense reads model.head, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("exact"), name)


def exact(model: nn.Module) -> nn.Module:
    """The fp32 eager model behind a FastModel (the model itself otherwise): the one whose answers are reported."""
    return model.exact if isinstance(model, FastModel) else model


@dataclass
class Engine:
    device: torch.device
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    precision_reason: str = "set"
    warn: object = None
    _fast: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, device: torch.device, precision="fp32", compile=False, channels_last="auto", warn=None) -> Engine:
        resolved, why = resolve_precision(precision, device)
        if not isinstance(compile, bool):
            raise UserError(f"compile must be true or false, got {compile!r}")
        if channels_last not in ("auto", True, False):
            raise UserError(f"channels_last must be auto, true or false, got {channels_last!r}")
        return cls(device, resolved, compile, channels_last, why, warn)

    def uses_channels_last(self, model) -> bool:
        if self.channels_last == "auto":
            return self.device.type == "cuda" and has_conv(model)
        return bool(self.channels_last)

    def fast(self, model: nn.Module) -> nn.Module:
        """The model to run attacks, training and sampling with (once per model: compiled once per process)."""
        if self.precision == "fp32" and not self.compile and not self.uses_channels_last(model):
            return model
        key = id(model)
        if key not in self._fast:
            layout = self.uses_channels_last(model)
            if layout:
                model.to(memory_format=torch.channels_last)
            self._fast[key] = FastModel(model, self.precision, self.device.type, self.compile, layout, self.warn)
        return self._fast[key]

    def describe(self, model=None) -> dict:
        """What run.json records about how the model ran."""
        out = {"device": str(self.device), "precision": self.precision, "precision_reason": self.precision_reason, "compile": self.compile}
        if model is not None:
            out["channels_last"] = self.uses_channels_last(model)
        return out


# ----------------------------------------------------------------------------------------------- devices
def resolve_device(spec: str) -> torch.device:
    spec = str(spec)
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = ranks_from_environment().local_rank  # one GPU per process under torchrun / SLURM tasks
        return torch.device(f"cuda:{local % torch.cuda.device_count()}")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device={spec} but no CUDA device is available here; use device=cpu or device=auto")
        index = int(spec.split(":")[1]) if ":" in spec and spec.split(":")[1].isdigit() else 0
        if ":" in spec and not spec.split(":")[1].isdigit():
            raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
        if index >= torch.cuda.device_count():
            raise UserError(f"device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device(spec)
    raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def shard_device(spec, shard=None) -> torch.device:
    """resolve_device, except that with device=auto the shards of one multirun spread over a node's GPUs: shard I
    runs on cuda:(I mod the number of visible GPUs), so a joblib sweep over data.shard gives each job its own GPU."""
    device = resolve_device(spec)
    if str(spec) == "auto" and device.type == "cuda" and shard is not None:
        return torch.device(f"cuda:{parse_shard(shard)[0] % torch.cuda.device_count()}")
    return device


def parse_shard(spec) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N: the I-th of N parts of the test set (SLURM_ARRAY_TASK_ID counts from 0)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise UserError(f"data.shard must be I/N with 0 <= I < N (e.g. data.shard=0/4 ... data.shard=3/4), got {spec!r}")
    return int(match.group(1)), int(match.group(2))


# ----------------------------------------------------------------------------------------------- batch sizes
class BatchSize:
    """A batch size setting: an integer, or `auto` (start at AUTO_BATCH_START and halve on out-of-memory errors).

    `setting` names the config key, so an error can say what to lower."""

    def __init__(self, spec, setting: str, device: torch.device, limit: int | None = None, start: dict | None = None):
        self.setting = setting
        self.auto = str(spec) == "auto"
        if not self.auto and not (isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1):
            raise UserError(f"{setting} must be a positive integer or auto, got {spec!r}")
        start = (start or AUTO_BATCH_START)["cuda" if device.type == "cuda" else "cpu"] if self.auto else int(spec)
        self.size = max(1, min(start, limit)) if (self.auto and limit) else start
        self.device = device
        self.halvings = 0

    @classmethod
    def halving(cls, size: int, setting: str, device: torch.device) -> BatchSize:
        """A fixed size that still halves on out-of-memory: for work whose result does not depend on it."""
        batch = cls("auto", setting, device)
        batch.size = int(size)
        return batch

    def out_of_memory(self, exc) -> None:
        """Called on an out-of-memory error: halve (auto) or raise the one-line error naming the setting."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.auto or self.size == 1:
            hint = (
                f"lower {self.setting} (now {self.size}) or set {self.setting}=auto"
                if not self.auto
                else "even one example does not fit: use a smaller model or precision=bf16"
            )
            raise UserError(f"out of memory on {self.device} at {self.setting}={self.size}: {hint}") from None
        self.size = max(1, self.size // 2)
        self.halvings += 1

    def describe(self) -> dict:
        return {"setting": self.setting, "auto": self.auto, "size": self.size, "halvings": self.halvings}


def out_of_memory_line(settings: str, device) -> str:
    return f"out of memory on {device}: lower {settings} or set it to auto (halves until it fits); precision=bf16 also halves activation memory"


def fit_batch(run, batch: BatchSize, on_halve=None):
    """run(size) with the largest size that fits: on out-of-memory, halve (auto) and run again from the start.

    For work whose result depends on the batch size (attacks draw their randomness per batch), so a restart
    gives exactly what a run at the final size gives."""
    while True:
        try:
            return run(batch.size)
        except torch.OutOfMemoryError as exc:
            batch.out_of_memory(exc)
            if on_halve is not None:
                on_halve(batch.size)


def chunked(fn, x: torch.Tensor, batch: BatchSize) -> torch.Tensor:
    """torch.cat of fn over chunks of x of at most batch.size rows, halving on out-of-memory errors.

    For work whose result does not depend on the chunking (classifying given inputs): nothing is redone."""
    out, start = [], 0
    while start < len(x):
        try:
            out.append(fn(x[start : start + batch.size]))
            start += min(batch.size, len(x) - start)
        except torch.OutOfMemoryError as exc:
            batch.out_of_memory(exc)
    return torch.cat(out) if out else fn(x[:0])


# ----------------------------------------------------------------------------------------------- many processes
@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel training job (torchrun, or SLURM tasks): rank 0 alone writes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def ranks_from_environment(env=None) -> Ranks:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (submitit's
    tasks_per_node), else a single process."""
    import os

    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return Ranks(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and env.get("ROBUST_SLURM_DDP", "1") == "1":
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")))
    return Ranks()


def init_distributed(ranks: Ranks, device: torch.device) -> None:
    """Join the process group once (gloo on the CPU, nccl on CUDA). Under SLURM without torchrun the rendezvous
    address comes from the job: the first node of SLURM_JOB_NODELIST, a port derived from the job id."""
    import os

    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host()
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world)


def _first_slurm_host() -> str:
    import os
    import subprocess

    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodes.split(",")[0]


def average_gradients(model: nn.Module, world: int) -> None:
    """All-reduce the parameter gradients (one flat buffer) and divide by the number of processes: the update of one
    process that saw the combined batch. Done by hand rather than with DDP's wrapper, because defenses also run the
    model for input gradients (attacks), which DDP's hooks would try to reduce."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers."""
    import torch.distributed as dist

    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def broadcast_object(value, ranks: Ranks):
    """Rank 0's value on every rank (a decision all must share, e.g. reuse or train)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
