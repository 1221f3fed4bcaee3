"""The one training loop of adlib: every trained method and backbone recipe runs on :func:`train`.

It owns what each method would otherwise repeat, and get subtly different:

- **device placement**, and mixed precision on CUDA (autocast in bfloat16 where the GPU supports
  it, else float16 with a gradient scaler); plain float32 on the CPU;
- **fixed seeds**: the weights' initialization is the caller's, the data order is drawn per epoch
  from ``(seed, epoch)`` and the global RNG (dropout, random augmentations) is seeded once;
- a **progress bar** with the running losses and a **record of every loss per step** (and per
  epoch) that a notebook can plot;
- **checkpoints** every ``checkpoint_every`` steps and at the end: the weights as safetensors, the
  optimizer, schedule and RNG state as a file that loads with ``torch.load(weights_only=True)``;
  ``resume=True`` continues where the last checkpoint stopped, bit-for-bit on the CPU (on CUDA as
  far as its kernels are deterministic: ``torch.use_deterministic_algorithms``), and refuses a
  checkpoint made with other settings;
- **DistributedDataParallel** when launched by ``torchrun`` (gloo on the CPU, nccl on CUDA): each
  process takes its shard of every epoch's permutation, PyTorch averages the gradients, and rank 0
  alone writes files and draws the progress bar.

A method supplies a model, its training data (a tensor, a tuple of tensors or a map-style
dataset, first axis = samples; or a :class:`StepStream` that makes each batch from its step number,
e.g. synthetic anomalies generated on the fly) and a loss function ``loss_fn(model, batch) -> {"loss": scalar,
...}``: the ``"loss"`` entry is minimized, every entry is recorded. ``model`` is the wrapped
(DDP) module when distributed, so ``loss_fn`` must go through ``model(...)``.
"""

from __future__ import annotations

import copy
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .settings import default_device

__all__ = ["TrainConfig", "History", "train", "distributed_context", "is_main_process", "LossFn",
           "load_checkpoint_state", "StepStream"]

Batch = Any
LossFn = Callable[[nn.Module, Batch], dict[str, Tensor]]
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"


@dataclass
class TrainConfig:
    """How to train: the optimization recipe plus run settings (device, checkpoints, progress).

    ``batch_size`` is per process (PyTorch's convention): with ``torchrun --nproc-per-node K`` an
    optimizer step sees ``K * batch_size`` samples. ``stop_after_steps`` ends the run early after
    that many optimizer steps in total, with a checkpoint (a budget, or an interruption in tests).
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"          # "adam" (L2 weight decay) or "adamw" (decoupled)
    schedule: str = "cosine"         # "cosine" (per step, to 0) or "constant"
    grad_clip: float | None = None   # max gradient norm, None = no clipping
    min_batch: int = 1               # a trailing batch smaller than this is skipped (batch norm needs 2)
    seed: int = 0
    device: str | torch.device | None = None
    amp: bool = True                 # mixed precision, on CUDA only
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 0        # steps between checkpoints; 0 = only at the end
    resume: bool = False             # continue from checkpoint_dir's last checkpoint if there is one
    stop_after_steps: int | None = None
    workers: int = 0                 # DataLoader worker processes for a StepStream (0 = in this process)
    desc: str = "train"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.min_batch < 1:
            raise ValueError(f"need epochs >= 0, batch_size >= 1, min_batch >= 1; got {self.epochs}, "
                             f"{self.batch_size}, {self.min_batch}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")


@dataclass
class History:
    """Every loss the run recorded: ``step[name]`` one value per optimizer step (averaged over the
    processes), ``epoch[name]`` the sample-weighted mean per epoch plus what ``on_epoch_end``
    returned, ``lr`` the learning rate of each step. ``world_size`` is the number of processes that
    trained (``torchrun``'s ``WORLD_SIZE``, 1 in a plain process): a step saw ``world_size *
    batch_size`` samples."""

    step: dict[str, list[float]] = field(default_factory=dict)
    epoch: dict[str, list[float]] = field(default_factory=dict)
    lr: list[float] = field(default_factory=list)
    resumed_at: int = 0      # steps restored from a checkpoint (0 for an unbroken run)
    world_size: int = 1      # processes that trained, as the run's distributed context found them

    @property
    def steps_this_session(self) -> int:
        """Optimizer steps taken by this call of :func:`train` (for rates after a resume)."""
        return self.steps - self.resumed_at

    @property
    def steps(self) -> int:
        return len(self.lr)

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "lr": self.lr}


# ---------------------------------------------------------------------------------------------
# Distributed: PyTorch's own engine, set up from torchrun's environment
# ---------------------------------------------------------------------------------------------

def distributed_context(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """``(rank, world_size, device, created)``: joins the process group ``torchrun`` describes
    (``WORLD_SIZE`` > 1) with gloo on the CPU or nccl on CUDA, one GPU per local rank. ``created``
    says whether this call made the group (and so the caller should destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    created = False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), device, created


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` launch, and in a plain single process: the one that writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# Data: a seeded permutation per epoch, sharded over processes, gathered in batches
# ---------------------------------------------------------------------------------------------

def _num_samples(data: Tensor | Sequence) -> int:
    if isinstance(data, tuple):
        sizes = {len(t) for t in data}
        if len(sizes) != 1:
            raise ValueError(f"the tensors of a data tuple must have the same first axis, got {sorted(sizes)}")
        return sizes.pop()
    return len(data)


def _gather(data: Tensor | Sequence, idx: Tensor) -> Batch:
    """Samples ``idx`` of the data: tensor rows, a tuple of tensors' rows, or a collated dataset batch."""
    if isinstance(data, Tensor):
        return data[idx]
    if isinstance(data, tuple):
        return tuple(t[idx] for t in data)
    from torch.utils.data import default_collate

    return default_collate([data[int(i)] for i in idx])


class StepStream(IterableDataset):
    """Training data made on the fly, one whole batch per optimizer step, as a pure function of
    ``(epoch, step, rank, world)``: nothing is stored, any process can start at any step, and a
    restarted run sees exactly the batches an unbroken one would.

    A subclass sets ``batch_size`` (per process) and implements :meth:`steps_per_epoch` and
    :meth:`batch`. The loop iterates a positioned copy (:meth:`at`) through a ``DataLoader``;
    with ``workers`` > 0 worker ``w`` of ``W`` makes the steps ``s`` with ``(s - start) % W == w``, and
    the loader's round-robin keeps the order, so the batches do not depend on the worker count.
    """

    batch_size: int
    _position: tuple[int, int, int, int] = (0, 0, 0, 1)

    def steps_per_epoch(self, world: int) -> int:
        """Optimizer steps in one epoch when ``world`` processes share it."""
        raise NotImplementedError

    def batch(self, epoch: int, step: int, rank: int, world: int) -> Batch:
        """The batch that process ``rank`` of ``world`` trains on at ``step`` of ``epoch``."""
        raise NotImplementedError

    def at(self, epoch: int, start: int, rank: int = 0, world: int = 1) -> "StepStream":
        """A shallow copy that iterates ``epoch`` from step ``start`` for process ``rank`` of ``world``."""
        positioned = copy.copy(self)
        positioned._position = (epoch, start, rank, world)
        return positioned

    def __iter__(self) -> Iterator[Batch]:
        epoch, start, rank, world = self._position
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(start, self.steps_per_epoch(world)):
            if (step - start) % workers == worker:   # the loader asks worker 0 first, then 1, ...
                yield self.batch(epoch, step, rank, world)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def epoch_batches(n: int, epoch: int, config: TrainConfig, rank: int = 0, world: int = 1) -> list[Tensor]:
    """Index batches of one epoch for one process: a permutation drawn from ``(seed, epoch)``, padded
    by wrapping so every process gets as many samples (as ``DistributedSampler`` does), this rank's
    every ``world``-th index, cut into ``batch_size`` pieces; a trailing piece below ``min_batch`` is dropped."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_rank = math.ceil(n / world)
    if per_rank * world > n:
        order = torch.cat([order, order[: per_rank * world - n]])
    pieces = list(order[rank::world].split(config.batch_size))
    if pieces and len(pieces[-1]) < config.min_batch:
        pieces.pop()
    return pieces


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _save_checkpoint(folder: Path, model: nn.Module, state: dict[str, Any], step: int) -> None:
    """Each file is replaced atomically; the weights carry their step, so a kill between the two
    replacements is detected on resume instead of pairing new weights with an old optimizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(folder / MODEL_FILE, lambda p: save_file(weights, p, metadata={"step": str(step)}))
    _atomic_write(folder / STATE_FILE, lambda p: torch.save(state, p))


def load_checkpoint_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint folder (optimizer, schedule, RNG, position, history), read
    with ``torch.load(weights_only=True)``: plain tensors, numbers, strings, lists and dicts only."""
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def autocast(device: torch.device, enabled: bool) -> tuple[Any, torch.dtype | None]:
    """The autocast context and its dtype: bf16 where the GPU has it, else fp16; none on the CPU."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _all_finite(loss: Tensor, world: int) -> bool:
    """Whether the loss is finite on every process (one all-reduce when distributed)."""
    flag = torch.isfinite(loss).all().to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _reduce_losses(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Each loss averaged over the processes (the record shows the whole step, not rank 0's shard)."""
    if world == 1:
        return values
    names = sorted(values)
    vec = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    return {k: float(v) / world for k, v in zip(names, vec.tolist())}


def train(model: nn.Module, loss_fn: LossFn, data: Tensor | tuple[Tensor, ...] | Sequence,
          config: TrainConfig, on_epoch_end: Callable[[int], dict[str, float]] | None = None,
          fingerprint: dict[str, Any] | None = None) -> History:
    """Minimize ``loss_fn(model, batch)["loss"]`` over ``config.epochs`` passes of ``data``.

    Args:
        model: its trainable parameters (``requires_grad``) are optimized; it is moved to the device.
        loss_fn: ``(model, batch) -> {"loss": scalar, other: scalar, ...}``; batches arrive on the device.
        data: a tensor or tuple of tensors ``(N, ...)`` (rows gathered by index), a map-style dataset,
            or a :class:`StepStream` (whose ``batch_size`` must equal the config's).
        config: the recipe and run settings (:class:`TrainConfig`).
        on_epoch_end: called with the epoch index after each epoch (model in eval mode); the floats
            it returns are recorded in ``History.epoch``.
        fingerprint: what else defines the run (a recipe, the data's name), JSON-like; stored in
            each checkpoint, and a resume with a different one is refused, as is one with another
            batch size, seed, schedule, number of epochs, samples or processes.

    Returns:
        The :class:`History`; with ``resume=True`` it includes the steps before the interruption.
        ``History.world_size`` is the number of processes that trained (1 without ``torchrun``).
    """
    with _TrainingRun(model, loss_fn, data, config, fingerprint) as run:
        for epoch in run.epochs():               # both loops end early once stop_after_steps is reached
            for batch, size in run.batches(epoch):
                run.step(batch, size)
            run.end_epoch(epoch, on_epoch_end)
        run.checkpoint()                         # the last one: at the end, or where the run stopped
    return run.history


class _TrainingRun:
    """The state of one call of :func:`train`, built in the order that makes a run reproducible:
    process group and device, data size, model on the device, optimizer, schedule, mixed precision,
    DDP wrapper, the seed, then the checkpoint to resume from and the progress bar.

    Used as a context manager: leaving it closes the bar, puts the model in eval mode and, where
    this run made the process group, destroys it (after a barrier when the run ended normally).
    What the loop reads: ``steps`` (int), the optimizer steps taken, those restored from a checkpoint
    included; ``stopping`` (bool), whether ``stop_after_steps`` was reached; ``history``
    (:class:`History`), the record :func:`train` returns.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Tensor | tuple[Tensor, ...] | Sequence,
                 config: TrainConfig, fingerprint: dict[str, Any] | None) -> None:
        self.model, self.loss_fn, self.data, self.config = model, loss_fn, data, config
        self.rank, self.world, self.device, self.created_group = distributed_context(default_device(config.device))
        self.stream = data if isinstance(data, StepStream) else None
        self.samples, self.steps_per_epoch = _epoch_size(data, self.stream, config, self.rank, self.world)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.params = _trainable_on(model, self.device)
        self.optimizer = _make_optimizer(self.params, config)
        self.schedule = _make_schedule(self.optimizer, self.total_steps, config)
        self.amp_context, amp_dtype = autocast(self.device, config.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.net = _distributed_model(model, self.world, self.device)
        self.identity = _identity(config, self.samples, self.world, fingerprint)
        torch.manual_seed(config.seed + self.rank)
        self.steps, self.epoch, self.stopping, self.stopped_mid_epoch = 0, 0, False, False
        self.history = History(world_size=self.world)
        self.running: dict[str, Any] = {"sums": {}, "seen": 0}     # this epoch's loss sums so far
        self.folder = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        if config.resume and self.folder is not None and (self.folder / STATE_FILE).is_file():
            self._restore(self.folder)
        self.bar = tqdm(total=self.total_steps, initial=self.steps, desc=config.desc, leave=False,
                        disable=not (self.rank == 0 and config.progress), dynamic_ncols=True)

    def __enter__(self) -> "_TrainingRun":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.bar.close()
        self.model.eval()
        if self.created_group:
            if exc_type is None:    # a failed rank must not wait for the others
                dist.barrier()
            dist.destroy_process_group()

    def epochs(self) -> Iterator[int]:
        """The epoch indices still to run, from the resumed position on, until ``stop_after_steps``."""
        for epoch in range(self.steps // max(1, self.steps_per_epoch), self.config.epochs):
            if self.stopping:
                return
            yield epoch

    def batches(self, epoch: int) -> Iterator[tuple[Batch, int]]:
        """``(batch on the device, samples in it)`` for this process's remaining steps of ``epoch``
        (model in train mode); ends early after the step that reaches ``stop_after_steps``."""
        self.epoch = epoch
        self.model.train()
        start = self.steps - epoch * self.steps_per_epoch
        pieces = _epoch(self.data, self.stream, self.samples, epoch, start, self.config, self.rank, self.world)
        for batch, size in pieces:
            yield _to_device(batch, self.device), size
            if self.stopping:
                return

    def step(self, batch: Batch, size: int) -> None:
        """One optimizer step on ``batch`` (``size`` samples on this process): the update, the record
        of its losses, the bar, and a checkpoint when one is due before the epoch's end."""
        losses = self._update(batch)
        self._record({k: float(v.detach()) for k, v in losses.items()}, size)
        end_of_epoch = self.steps == (self.epoch + 1) * self.steps_per_epoch
        if self.config.stop_after_steps is not None and self.steps >= self.config.stop_after_steps:
            self.stopping = True
            self.stopped_mid_epoch = not end_of_epoch   # its summary waits for the resume
        elif self._checkpoint_due() and not end_of_epoch:
            self.checkpoint()      # on an epoch's end it waits until the epoch is summarized

    def end_epoch(self, epoch: int, on_epoch_end: Callable[[int], dict[str, float]] | None) -> None:
        """Records a completed epoch in ``History.epoch``: each loss's sample-weighted mean, then the
        floats ``on_epoch_end(epoch)`` returns (model in eval mode); then a checkpoint if one is due
        and the run goes on. Does nothing after a stop in mid-epoch."""
        if self.stopped_mid_epoch:
            return
        for k, v in self.running["sums"].items():
            self.history.epoch.setdefault(k, []).append(v / max(1, self.running["seen"]))
        self.running = {"sums": {}, "seen": 0}
        if on_epoch_end is not None:
            self.model.eval()
            for k, v in on_epoch_end(epoch).items():
                self.history.epoch.setdefault(k, []).append(float(v))
        if not self.stopping and self._checkpoint_due() and self.steps < self.total_steps:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Writes the weights and the trainer state at ``steps`` (rank 0 writes, every rank's RNG state
        is kept); a no-op without ``checkpoint_dir``. Collective: every rank calls it at the same step."""
        if self.folder is None:
            return
        state = {"step": self.steps, "identity": self.identity, "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": _rng_state(self.device), "history": self.history.as_dict(), "running": self.running}
        if self.world > 1:   # every rank's RNG, so each continues its own stream
            gathered = [None] * self.world
            dist.all_gather_object(gathered, state["rng"])
            state["rng_ranks"] = gathered
        if self.rank == 0:
            _save_checkpoint(self.folder, self.model, state, self.steps)
        if self.world > 1:
            dist.barrier()

    def _update(self, batch: Batch) -> dict[str, Tensor]:
        """Forward under autocast, the finiteness check on every process, backward, clipping, the
        optimizer and schedule steps; records the step's learning rate and returns ``loss_fn``'s dict."""
        with self.amp_context:
            losses = self.loss_fn(self.net, batch)
        loss = losses["loss"]
        if not _all_finite(loss.detach(), self.world):   # every rank stops together, none hangs
            raise FloatingPointError(f"{self.config.desc}: loss became {loss.item()} at step {self.steps} "
                                     f"(on this or another process); lower the learning rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.history.lr.append(self.optimizer.param_groups[0]["lr"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.steps += 1
        return losses

    def _record(self, losses: dict[str, float], size: int) -> None:
        """Adds the step's losses (averaged over the processes) to the history, the epoch's running
        sums (weighted by ``size`` samples) and the progress bar."""
        values = _reduce_losses(losses, self.world, self.device)
        for k, v in values.items():
            self.history.step.setdefault(k, []).append(v)
            self.running["sums"][k] = self.running["sums"].get(k, 0.0) + v * size
        self.running["seen"] += size
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def _checkpoint_due(self) -> bool:
        return bool(self.config.checkpoint_every) and self.steps % self.config.checkpoint_every == 0

    def _restore(self, folder: Path) -> None:
        """Loads the checkpoint in ``folder`` into the model, optimizer, schedule, scaler and RNG, and
        takes over its step count, history and the interrupted epoch's running sums."""
        from safetensors.torch import load_file

        state = _checked_state(folder, self.identity)
        self.model.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(self.device)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"] and self.scaler.is_enabled():   # empty when written without float16 scaling
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng_ranks"][self.rank] if "rng_ranks" in state else state["rng"], self.device)
        self.steps, h = int(state["step"]), state["history"]
        self.history = History(step=h["step"], epoch=h["epoch"], lr=h["lr"], resumed_at=self.steps,
                               world_size=self.world)
        self.running = state["running"]


def _epoch_size(data: Tensor | Sequence, stream: StepStream | None, config: TrainConfig, rank: int,
                world: int) -> tuple[int, int]:
    """``(samples per epoch over all processes, optimizer steps per epoch)``; refuses data that
    gives no step (no samples, fewer than ``min_batch`` per process, a stream of another batch size)."""
    if stream is not None:
        if stream.batch_size != config.batch_size:
            raise ValueError(f"the stream makes batches of {stream.batch_size}, the config asks for {config.batch_size}")
        steps_per_epoch = stream.steps_per_epoch(world)
        n = steps_per_epoch * config.batch_size * world
    else:
        n = _num_samples(data)
        steps_per_epoch = len(epoch_batches(n, 0, config, rank, world)) if n else 0
    if n == 0:
        raise ValueError("no training samples")
    if steps_per_epoch == 0 and config.epochs > 0:
        raise ValueError(f"{n} samples give no batch of at least min_batch={config.min_batch} per process")
    return n, steps_per_epoch


def _trainable_on(model: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """Moves ``model`` to ``device`` and returns its parameters with ``requires_grad``; refuses none."""
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    return params


def _distributed_model(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when ``world`` > 1, else ``model`` itself."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _identity(config: TrainConfig, samples: int, world: int, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the recipe, the samples per epoch,
    the number of processes and the caller's ``fingerprint``."""
    return {"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
            "weight_decay": config.weight_decay, "optimizer": config.optimizer, "schedule": config.schedule,
            "min_batch": config.min_batch, "samples": samples, "world": world, **(fingerprint or {})}


def _epoch(data: Any, stream: StepStream | None, n: int, epoch: int, start: int, config: TrainConfig,
           rank: int, world: int) -> Iterator[tuple[Batch, int]]:
    """``(batch, number of samples)`` for this process's steps of ``epoch`` from step ``start`` on."""
    if stream is not None:
        loader = DataLoader(stream.at(epoch, start, rank, world), batch_size=None, num_workers=config.workers)
        for batch in loader:
            yield batch, config.batch_size
        return
    for idx in epoch_batches(n, epoch, config, rank, world)[start:]:
        yield _gather(data, idx), len(idx)


def _checked_state(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of the checkpoint in ``folder`` (:func:`load_checkpoint_state`), after
    refusing one made with another ``identity`` or whose weights are from another step."""
    from safetensors import safe_open

    state = load_checkpoint_state(folder)
    before = state.get("identity", {})
    changed = sorted(k for k in set(before) | set(identity) if _plain(before.get(k)) != _plain(identity.get(k)))
    if changed:
        raise ValueError(f"the checkpoint in {folder} was made with other settings ({', '.join(changed)}: "
                         f"{', '.join(f'{before.get(k)!r} there, {identity.get(k)!r} now' for k in changed[:3])}); "
                         f"resume with the same ones, or start a new run without resume")
    with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
        weights_step = int((f.metadata() or {}).get("step", -1))
    if weights_step != state["step"]:
        raise ValueError(f"{folder}: the weights are from step {weights_step}, the optimizer state from step "
                         f"{state['step']} (the run was stopped while writing them); start a new run")
    return state


def _plain(value: Any) -> Any:
    """Tuples as lists, as they come back from a saved file, so that equal settings compare equal."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
