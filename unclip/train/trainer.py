"""The one training loop every training stage uses (CLIP, the priors, the decoder, the upsamplers).

A stage supplies a ``TrainTask``: how to build its model (from a config dict that the checkpoint
carries, so a resumed or released model is rebuilt from the checkpoint alone), an iterator of
micro-batches that can start at a given position, and its loss. Everything else is here, once:

- a fixed step budget; gradient accumulation; global-norm clipping; AdamW with decay on 2-D weights
  only; the learning rate a pure function of the step (linear warmup, cosine decay), so a resumed run
  follows the same schedule exactly;
- EMA weights through ``torch.optim.swa_utils.AveragedModel`` (with a warmed-up decay, so short runs
  are not dominated by the initialisation), sharded as the model is under FSDP;
- bf16 autocast on CUDA, fp32 on CPU; DDP or FSDP applied from outside by ``distributed.wrap_model``;
  optionally ``torch.compile`` around the training steps' forward and backward (``compile``);
- a self-describing checkpoint every ``checkpoint_every`` steps and at exit: model config, weights,
  EMA, optimiser, step, data position, every rank's RNG states and task state (e.g. its position in
  the data stream) and the lineage (dataset, PCA and
  code versions); written atomically, by default from a background thread on a snapshot of the
  state while training goes on, the newest found through ``checkpoints/latest.json`` (moved only
  once its file is whole), and a run resumes from it automatically;
- a guard that stops on a non-finite loss or gradient with a clear error, before the optimiser step,
  so the last checkpoint stays the last good one;
- TensorBoard scalars (``<out>/tensorboard``) and a ``progress.json`` that the Prefect side turns into
  a progress artifact (a torchrun worker has no Prefect context of its own);
- held-out evaluation every ``eval_every`` steps when the task has an ``evaluate``, on the weights it
  would release (the EMA's), with the RNG states put back afterwards so it changes nothing in the
  training; the metrics go to TensorBoard (``<stage>/eval/*``) and ``eval_history.json``.

Distributed: ``batch_size`` is the global batch; each of ``world_size`` processes takes
``batch_size / (world_size * grad_accum)`` samples per micro-batch. Rank 0 writes checkpoints, logs
and progress; every rank reads the checkpoint on resume.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel

from unclip import storage
from unclip.config import StageTrainConfig
from unclip.train import distributed

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm went NaN/inf; training stopped before the optimiser step."""


class TrainTask(Protocol):
    """What a training stage supplies to the trainer."""

    name: str

    def model_config(self) -> dict:
        """JSON-serialisable description from which ``build_model`` rebuilds the network."""

    def build_model(self, model_config: dict) -> nn.Module:
        """The network, initialised (the trainer seeds torch first)."""

    def batches(self, micro_batch: int, start: int, ctx: distributed.DistContext) -> Iterator[Any]:
        """This rank's micro-batches of ``micro_batch`` samples, starting after ``start`` micro-batches
        (the data position: a resumed run continues the same stream)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss of a micro-batch and scalars to log (averaged over the logging window)."""

    # Optional: ``evaluate(model) -> dict[str, float]``, held-out metrics of the unwrapped (EMA when
    # there is one) model in eval mode, called on rank 0 every ``eval_every`` steps; ``fsdp_blocks(model)
    # -> list[nn.Module]``, the modules FSDP shards as units of their own (else the model's own
    # ``fsdp_blocks()``); ``state_dict()`` / ``load_state_dict(state)``, the task's share of a checkpoint;
    # ``after_step(model)``, called under no_grad after each optimiser step and before the EMA update (a
    # constraint on the weights, such as CLIP's bound on its logit scale).


@dataclass
class TrainResult:
    step: int
    checkpoint: str
    resumed_from: int | None


# -- the schedule -----------------------------------------------------------------------------------
def lr_at(step: int, cfg: StageTrainConfig) -> float:
    """The learning rate for optimiser step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def ema_avg_fn(decay: float) -> Callable:
    """AveragedModel's ``multi_avg_fn``: EMA whose decay ramps up as min(decay, (1+n)/(10+n)) over the
    first updates (n = updates so far), so a short run's EMA is not stuck near the initialisation."""

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        floats = [(e, c) for e, c in zip(ema, current) if e.is_floating_point()]
        # under FSDP the parameters are DTensors and the buffers plain tensors: one foreach call may not mix them
        for sharded in (True, False):
            group = [(e, c) for e, c in floats if isinstance(e, DTensor) == sharded]
            if group:
                torch._foreach_lerp_([e for e, _ in group], [c for _, c in group], 1.0 - d)
        for e, c in zip(ema, current):  # integer buffers (BatchNorm's step count) are copied
            if not e.is_floating_point():
                e.copy_(c)

    return update


def non_persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers left out of the state dict (open_clip's causal attention mask, full of -inf): constants
    derived from the config, not state. The EMA copies them; averaging one gives -inf - -inf = NaN."""
    return [(f"{prefix}.{name}" if prefix else name, buf) for prefix, sub in module.named_modules()
            for name, buf in sub.named_buffers(recurse=False) if name in sub._non_persistent_buffers_set]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices and embeddings (dim >= 2); none on biases, norms' gains, scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- checkpoints ------------------------------------------------------------------------------------
def checkpoint_dir(out_dir: str) -> str:
    return storage.join(out_dir, "checkpoints")


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint of a training output folder, or None."""
    pointer = storage.join(checkpoint_dir(out_dir), "latest.json")
    if not storage.exists(pointer):
        return None
    uri = storage.read_json(pointer)["checkpoint"]
    return uri if storage.exists(uri) else None


def load_checkpoint(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequested(Exception):
    pass


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimiser state dicts on CPU, whatever the wrapper."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def _load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def _full_model_state(model: nn.Module) -> dict:
    """An FSDP-sharded module's state dict gathered into full tensors on CPU: a collective that every
    rank must call; rank 0 gets the weights, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _full_ema_state(ema: AveragedModel, sharded: bool) -> dict:
    """The EMA's state dict with full tensors on CPU (AveragedModel's keys: ``module.*`` and
    ``n_averaged``); under FSDP every rank must call it, and rank 0 gets the gathered weights."""
    if not sharded:
        return ema.state_dict()
    full = _full_model_state(ema.module)
    return {**{f"module.{k}": v for k, v in full.items()}, "n_averaged": ema.n_averaged.detach().cpu()}


def _ema_module_state(state: dict) -> dict:
    """The averaged network's weights from an EMA state dict (AveragedModel's keys: ``module.*``)."""
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}


def _load_ema(ema: AveragedModel, state: dict, sharded: bool) -> None:
    """Load ``_full_ema_state``'s dict; under FSDP each rank keeps its own shard of it."""
    if not sharded:
        ema.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(ema.module, _ema_module_state(state), options=StateDictOptions(full_state_dict=True))
    ema.n_averaged.copy_(state["n_averaged"])


# -- the loop ---------------------------------------------------------------------------------------
def check_batch_split(name: str, cfg: StageTrainConfig, world_size: int, how: str = "") -> None:
    """A ValueError unless each of ``cfg.grad_accum`` micro-batches of the global batch splits evenly
    over ``world_size`` processes (``how``: where that number comes from, for the message)."""
    if (cfg.batch_size // cfg.grad_accum) % world_size:
        raise ValueError(f"train.{name}.batch_size {cfg.batch_size} does not split into {cfg.grad_accum} "
                         f"micro-batches over {world_size} processes{how}")


class Trainer:
    """Train ``task`` for ``cfg.steps`` optimiser steps, writing into ``out_dir``.

    ``lineage`` (dataset version, PCA version, code version, ...) goes into every checkpoint.
    ``on_progress(step, steps, scalars)`` is called on rank 0 at each log step (in-process use).
    """

    def __init__(self, task: TrainTask, cfg: StageTrainConfig, out_dir: str, *, lineage: dict | None = None,
                 strategy: str = "ddp", ctx: distributed.DistContext | None = None,
                 on_progress: Callable[[int, int, dict], None] | None = None) -> None:
        self.task, self.cfg, self.out_dir = task, cfg, out_dir
        self.lineage = lineage or {}
        self.strategy = strategy
        self.ctx = ctx or distributed.init()
        # FSDP applies only under a process group (distributed.wrap_model leaves the model plain without one)
        self.sharded = strategy == "fsdp" and torch.distributed.is_initialized()
        self.on_progress = on_progress
        check_batch_split(task.name, cfg, self.ctx.world_size)
        self.micro_batch = cfg.batch_size // cfg.grad_accum // self.ctx.world_size
        self.main = self.ctx.rank == 0
        self._saving: threading.Thread | None = None
        self._save_error: BaseException | None = None

    # the checkpoint a run resumes from: its own latest
    def _resume_state(self) -> dict | None:
        uri = latest_checkpoint(self.out_dir)
        return load_checkpoint(uri) if uri else None

    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        state = self._resume_state()
        model_config = state["model_config"] if state else self.task.model_config()
        torch.manual_seed(cfg.seed)
        model = self.task.build_model(model_config)
        def new_ema() -> AveragedModel | None:
            return AveragedModel(model, multi_avg_fn=ema_avg_fn(cfg.ema_decay), use_buffers=True) \
                if cfg.ema_decay is not None else None

        ema = None
        if self.sharded:
            # FSDP's modules cannot be deep-copied: the EMA copies the plain model and is then sharded as
            # the model is, so each rank averages its own shard and no rank holds the full EMA
            ema = new_ema()
            if ema is not None:
                distributed.wrap_model(ema.module, "fsdp", ctx, blocks=self._fsdp_blocks(ema.module))
        wrapped = distributed.wrap_model(model, self.strategy, ctx, blocks=self._fsdp_blocks(model))
        if not self.sharded:  # after wrapping: a copy on the model's device
            ema = new_ema()
        # what the task's loss calls: the wrapped model, compiled when asked; its parameters, state dict and
        # no_sync are the wrapped model's, so nothing else sees the compilation
        step_model = torch.compile(wrapped) if cfg.compile else wrapped
        model_constants = non_persistent_buffers(model)
        ema_constants = non_persistent_buffers(ema.module) if ema is not None else []
        # fused: one kernel over all parameters; measured 7x faster than the foreach step on CPU for the
        # priors' 17M parameters (0.044 s against 0.318 s a step, 1 thread), memory-bound either way
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=cfg.betas,
                                      eps=cfg.eps, fused=True)
        after_step = getattr(self.task, "after_step", None)
        # every rank built the same weights from one seed; from here on each draws its own random numbers
        # (diffusion timesteps and noise, dropped conditioning), else a global batch holds each draw
        # world_size times. Rank 0 keeps the single-process stream. A resumed run restores each rank's own.
        if ctx.rank > 0:
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
        step, resumed_from = 0, None
        if state:
            if state.get("stage") != self.task.name:
                raise ValueError(f"{self.out_dir}: its checkpoint is of stage {state.get('stage')!r}, "
                                 f"not {self.task.name!r}")
            saved_world = int(state.get("data_position", {}).get("world_size", len(state["rng"])))
            if saved_world != ctx.world_size:
                # each rank's data position and random state are its own: on another number of processes
                # the streams are split differently, and resuming would repeat or skip samples
                raise ValueError(f"{self.out_dir}: its checkpoint (step {state['step']}) was written by "
                                 f"{saved_world} processes and this run has {ctx.world_size}; resume it with "
                                 f"{saved_world}, or train the stage afresh in a new run")
            _load_full_state(wrapped, optimizer, state["model"], state["optimizer"])
            if ema is not None and state.get("ema") is not None:
                _load_ema(ema, state["ema"], self.sharded)
            if hasattr(self.task, "load_state_dict") and state.get("task_state") is not None:
                self.task.load_state_dict(state["task_state"][min(ctx.rank, len(state["task_state"]) - 1)])
            step = resumed_from = int(state["step"])
            _set_rng_state(state["rng"][min(ctx.rank, len(state["rng"]) - 1)])
        writer = self._writer()
        self._trim_eval_history(step)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        stop = {"signal": None}
        previous = self._trap_signals(stop)
        batches = self.task.batches(self.micro_batch, step * cfg.grad_accum, ctx)
        window: dict[str, float] = {}
        window_n, t0, samples = 0, time.perf_counter(), 0
        last_ckpt = latest_checkpoint(self.out_dir)
        saved_step = step if last_ckpt else None  # the step the newest checkpoint holds
        finished_cleanly = stopping = False
        try:
            wrapped.train()
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                scalars: dict[str, float] = {}
                total = torch.zeros((), device=ctx.device)
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    # DDP syncs gradients on the last micro-batch only
                    sync = micro == cfg.grad_accum - 1 or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
                    with (wrapped.no_sync() if not sync else contextlib.nullcontext()), autocast:
                        loss, extra = self.task.loss(step_model, batch)
                        (loss / cfg.grad_accum).backward()
                    total += loss.detach().float() / cfg.grad_accum
                    for k, v in extra.items():
                        scalars[k] = scalars.get(k, 0.0) + float(v) / cfg.grad_accum
                # the stop flag rides on the loss's all-reduce: every rank stops after the same step, however
                # the signal reached them, so the exit checkpoint's collectives meet
                reduced = distributed.all_reduce_mean(
                    torch.stack([total, torch.tensor(float(stop["signal"] is not None), device=ctx.device)]))
                mean_loss, stopping = reduced[0], bool(reduced[1] > 0)
                if cfg.grad_clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                if not (torch.isfinite(mean_loss) and torch.isfinite(grad_norm)):
                    raise NonFiniteLossError(
                        f"train.{self.task.name}: the loss is {float(mean_loss)} and the gradient norm "
                        f"{float(grad_norm)} at step {step}; stopped before the optimiser step. The last good "
                        f"checkpoint is {last_ckpt or 'none (no checkpoint was written yet)'}. Lower the "
                        f"learning rate (now {lr:.3g}) or check the data.")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    with torch.no_grad():
                        after_step(model)
                if ema is not None:
                    ema.update_parameters(model)
                    for (_, e), (_, c) in zip(ema_constants, model_constants):
                        e.copy_(c)
                step += 1
                samples += cfg.batch_size
                scalars.update(loss=float(mean_loss), lr=lr, grad_norm=float(grad_norm))
                for k, v in scalars.items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - t0
                    logged = {k: v / window_n for k, v in window.items()}
                    logged["samples_per_s"] = samples / max(elapsed, 1e-9)
                    self._log(writer, step, logged)
                    window, window_n, t0, samples = {}, 0, time.perf_counter(), 0
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    last_ckpt, saved_step = self._save(step, wrapped, optimizer, ema, model_config), step
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    self._evaluate(writer, step, ema.module if ema is not None else model, model_config)
                if stopping:
                    raise _StopRequested()
            finished_cleanly = True
        except _StopRequested:
            pass
        except BaseException as e:
            self._restore_signals(previous)
            if self._saving is not None:  # a failing run still finishes writing its last good checkpoint
                self._saving.join()
                self._saving = None
            if self._save_error is not None:  # and says if that write failed: its error would be lost
                e.add_note(f"train.{self.task.name}: writing a checkpoint failed too: {self._save_error!r}; the last "
                           f"whole checkpoint is {latest_checkpoint(self.out_dir) or 'none'}")
                self._save_error = None
            raise
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # a task's reader threads and files end with the run, not at garbage collection
                close()
            if writer is not None:
                writer.flush()
        try:
            # the exit checkpoint: after a finished step (a failed one left the last good one in place);
            # SIGTERM stays trapped until it is written, so a second signal cannot kill one process
            # inside the collectives of the others
            if finished_cleanly or stopping:
                if saved_step != step:
                    last_ckpt = self._save(step, wrapped, optimizer, ema, model_config)
            self._checkpoint_written()
        finally:
            self._restore_signals(previous)
        if writer is not None:
            writer.close()
        if stopping:
            how = f"signal {stop['signal']}" if stop["signal"] is not None else "a signal to another process"
            when = f"after its last step ({step}): training is complete, and resuming the run goes on from " \
                   f"there" if step == cfg.steps else f"at step {step}"
            raise KeyboardInterrupt(f"train.{self.task.name}: stopped by {how} {when}; checkpoint {last_ckpt}")
        self._progress(step, {"done": True})
        return TrainResult(step=step, checkpoint=last_ckpt or "", resumed_from=resumed_from)

    def released(self, result: TrainResult) -> tuple[nn.Module, dict, dict[str, Any]]:
        """After ``run`` (rank 0): the network a stage releases, rebuilt from the final checkpoint with
        its EMA weights (the live ones when there is no EMA), in eval mode; its model config; and its
        held-out metrics: the trainer's evaluation at the final step when it made one, else the task's
        ``evaluate`` now (empty when the task has none)."""
        state = load_checkpoint(result.checkpoint)
        weights = _ema_module_state(state["ema"]) if state.get("ema") is not None else state["model"]
        model = self._plain_model(state["model_config"], weights).eval()
        history = self.eval_history()
        if history and history[-1]["step"] == result.step:
            metrics = {k: v for k, v in history[-1].items() if k not in ("step", "seconds")}
        else:
            metrics = dict(self.task.evaluate(model)) if hasattr(self.task, "evaluate") else {}
        return model, state["model_config"], metrics

    # -- pieces --------------------------------------------------------------------------------------
    def _plain_model(self, model_config: dict, weights: dict) -> nn.Module:
        """The task's network, unwrapped, with ``weights`` (full tensors), on this process's device."""
        model = self.task.build_model(model_config)
        model.load_state_dict(weights)
        return model.to(self.ctx.device)

    def _fsdp_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP shards as units of their own: the task's choice (``fsdp_blocks(model)``, for
        models built elsewhere such as open_clip's), else the model's ``fsdp_blocks()``, else none."""
        if hasattr(self.task, "fsdp_blocks"):
            return self.task.fsdp_blocks(model)
        return model.fsdp_blocks() if hasattr(model, "fsdp_blocks") else []

    def _writer(self):
        if not self.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(storage.fs_and_path(storage.join(self.out_dir, "tensorboard"))[1]
                             if storage.is_local(self.out_dir) else storage.join(self.out_dir, "tensorboard"))

    def _log(self, writer, step: int, scalars: dict[str, float]) -> None:
        if not self.main:
            return
        for k, v in scalars.items():
            writer.add_scalar(f"{self.task.name}/{k}", v, step)
        writer.flush()
        self._progress(step, scalars)
        if self.on_progress is not None:
            self.on_progress(step, self.cfg.steps, scalars)

    def _eval_history_uri(self) -> str:
        return storage.join(self.out_dir, "eval_history.json")

    def eval_history(self) -> list[dict]:
        """The held-out evaluations made during training: ``[{"step": n, metric: value, ...}, ...]``."""
        uri = self._eval_history_uri()
        return storage.read_json(uri) if storage.exists(uri) else []

    def _trim_eval_history(self, step: int) -> None:
        """On (re)start: drop evaluations past the checkpoint resumed from (a killed run may have made
        some); the resumed run makes them again at the same steps."""
        uri = self._eval_history_uri()
        if self.main and storage.exists(uri):
            storage.write_json(uri, [e for e in storage.read_json(uri) if e["step"] <= step])

    def _evaluate(self, writer, step: int, model: nn.Module, model_config: dict) -> None:
        """The task's held-out evaluation of ``model`` (the EMA's network, else the live one) on rank 0,
        logged and appended to the eval history; the training's RNG streams are left as they were."""
        if not hasattr(self.task, "evaluate"):
            return
        full = None
        if self.sharded:
            # each rank holds shards of the weights: every rank takes part in gathering them (onto rank 0's
            # CPU, as a checkpoint does), and rank 0 evaluates a plain copy, as the stage's release does; also on
            # one process, where the sharded module's parameters are DTensors that a method other than forward
            # (the diffusion prior's sampling calls ``prefix``) meets unsharded
            full = _full_model_state(model)
        if not self.main:
            return
        rng = _rng_state()
        t0 = time.perf_counter()
        try:
            if full is not None:
                # a task's build_model may keep what it builds (ImageTask.net, CLIP's transforms): the
                # training's must stay, so the task's attributes are put back before it evaluates
                saved = dict(vars(self.task))
                model = self._plain_model(model_config, full)
                vars(self.task).clear()
                vars(self.task).update(saved)
                del full
            was_training = model.training
            model.eval()
            try:
                metrics = {k: float(v) for k, v in self.task.evaluate(model).items() if isinstance(v, (int, float))}
            finally:
                model.train(was_training)
        finally:
            _set_rng_state(rng)
        if not metrics:  # nothing held out to evaluate on
            return
        metrics["seconds"] = time.perf_counter() - t0
        for k, v in metrics.items():
            writer.add_scalar(f"{self.task.name}/eval/{k}", v, step)
        writer.flush()
        storage.write_json(self._eval_history_uri(), [*self.eval_history(), {"step": step, **metrics}])

    def _progress(self, step: int, scalars: dict) -> None:
        if self.main:
            storage.write_json(storage.join(self.out_dir, "progress.json"),
                               {"stage": self.task.name, "step": step, "steps": self.cfg.steps, **scalars})

    def _save(self, step: int, wrapped: nn.Module, optimizer, ema, model_config: dict) -> str:
        model_sd, optim_sd = _full_state(wrapped, optimizer)
        ema_sd = _full_ema_state(ema, self.sharded) if ema is not None else None  # a collective under FSDP
        rng = _gather(self.ctx, _rng_state())
        task_state = _gather(self.ctx, self.task.state_dict()) if hasattr(self.task, "state_dict") else None
        uri = storage.join(checkpoint_dir(self.out_dir), f"step-{step:08d}.pt")
        if self.cfg.async_checkpoint:
            self._checkpoint_written()  # one write in flight at most
        if self.main:
            try:  # whatever fails on rank 0 here reaches every rank below, not only rank 0
                state = {
                    "format": CHECKPOINT_FORMAT, "stage": self.task.name, "step": step,
                    "model_config": model_config, "model": model_sd, "optimizer": optim_sd,
                    "ema": ema_sd,
                    "train_config": self.cfg.model_dump(mode="json"),
                    "data_position": {"micro_batches": step * self.cfg.grad_accum, "micro_batch": self.micro_batch,
                                      "world_size": self.ctx.world_size},
                    "task_state": task_state,
                    "rng": rng, "lineage": self.lineage,
                    "lr": lr_at(max(step - 1, 0), self.cfg),
                }
                if self.cfg.async_checkpoint:
                    # the loop goes on while a thread writes a snapshot (the live tensors change next step)
                    snapshot = _tree_clone(state)
                    self._saving = threading.Thread(target=self._write_checkpoint, args=(uri, snapshot, step),
                                                    name=f"checkpoint-{step}", daemon=True)
                    self._saving.start()
                else:
                    self._write_checkpoint(uri, state, step)
            except Exception as e:  # noqa: BLE001 - raised on every rank by _checkpoint_written
                self._save_error = e
        # sync: this write's error; async: an error starting it (the write's own comes at the next wait)
        self._checkpoint_written(wait=not self.cfg.async_checkpoint)
        return uri

    def _write_checkpoint(self, uri: str, state: dict, step: int) -> None:
        try:
            with storage.atomic_open(uri, "wb") as f:
                torch.save(state, f)
            # latest.json moves only after the file is whole: a run killed mid-write resumes from the one before
            storage.write_json(storage.join(checkpoint_dir(self.out_dir), "latest.json"),
                               {"checkpoint": uri, "step": step})
            self._prune(uri)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread at the next wait
            self._save_error = e

    def wait_for_checkpoint(self, join: bool = True) -> None:
        """Block until the checkpoint being written (if any) is on storage (``join``); raise its write
        error, or one recorded in starting it."""
        if join and self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._save_error is not None:
            err, self._save_error = self._save_error, None
            raise RuntimeError(f"train.{self.task.name}: writing a checkpoint failed: {err!r}") from err

    def _checkpoint_written(self, wait: bool = True) -> None:
        """On every rank (a collective): wait for rank 0's checkpoint write in flight (``wait``; else only
        look for an error already recorded), and raise its error on every rank alike, so that no rank is
        left waiting in a collective for one that stopped."""
        error = None
        if self.main:
            try:
                self.wait_for_checkpoint(join=wait)
            except RuntimeError as e:
                error = e
        failed = [m for m in _gather(self.ctx, None if error is None else str(error)) if m is not None]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank 0 stopped: {failed[0]}")

    def _prune(self, newest: str) -> None:
        found = sorted(u for u in storage.listdir(checkpoint_dir(self.out_dir)) if u.endswith(".pt"))
        for u in found[:-self.cfg.keep_checkpoints]:
            if u != newest:
                storage.remove(u)

    def _trap_signals(self, stop: dict) -> dict:
        """SIGTERM (a preempted pod, torchrun passing on a stop) ends the loop after the current step,
        with an exit checkpoint."""
        if not hasattr(signal, "SIGTERM") or _not_main_thread():
            return {}

        def handler(signum, frame):
            stop["signal"] = signum

        return {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


def load_step(out_dir: str) -> int | None:
    pointer = storage.join(checkpoint_dir(out_dir), "latest.json")
    return storage.read_json(pointer)["step"] if storage.exists(pointer) else None


def _gather(ctx: distributed.DistContext, mine: Any) -> list:
    """Every rank's ``mine`` in rank order (RNG states, data positions): each rank resumes its own."""
    if ctx.world_size == 1 or not torch.distributed.is_initialized():
        return [mine]
    out: list = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, mine)
    return out


def _tree_clone(obj: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples) whose tensors no longer share memory with training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _tree_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_clone(v) for v in obj)
    return obj


def _not_main_thread() -> bool:
    import threading

    return threading.current_thread() is not threading.main_thread()


