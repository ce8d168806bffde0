"""The shared trainer: schedule, EMA, clipping, accumulation, checkpoints and exact resume, the NaN
guard, TensorBoard event files, and 2-process DDP against 1 process on the same global batch."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unclip import storage
from unclip.config import LaunchConfig, StageTrainConfig
from unclip.train import trainer as tr
from unclip.train.distributed import LaunchError, launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_task import EvalToyTask, ToyTask, save_failing_at  # noqa: E402

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
       "CUDA_VISIBLE_DEVICES": ""}


def _cfg(**kw) -> StageTrainConfig:
    base = dict(steps=12, batch_size=8, lr=0.05, warmup_steps=3, checkpoint_every=4, log_every=2, seed=0,
                ema_decay=0.9, grad_clip=1.0, weight_decay=0.01)
    return StageTrainConfig(**{**base, **kw})


def _weights(out: str) -> dict[str, torch.Tensor]:
    return tr.load_checkpoint(tr.latest_checkpoint(out))["model"]


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = StageTrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [tr.lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert tr.lr_at(9, cfg) == pytest.approx(1.0)
    assert tr.lr_at(10, cfg) == pytest.approx(1.0)
    assert tr.lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert tr.lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [tr.lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_warms_up_then_tracks_with_its_decay():
    update = tr.ema_avg_fn(0.9)
    ema, cur = [torch.zeros(3)], [torch.ones(3)]
    update(ema, cur, torch.tensor(0))  # first update: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema[0], torch.full((3,), 0.9))
    ema = [torch.zeros(3)]
    update(ema, cur, torch.tensor(1000))  # late: the configured decay
    assert torch.allclose(ema[0], torch.full((3,), 0.1))


def test_param_groups_decay_matrices_only():
    groups = tr.param_groups(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)), 0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2] and groups[0]["weight_decay"] == 0.1
    assert sorted(p.ndim for p in groups[1]["params"]) == [1, 1, 1] and groups[1]["weight_decay"] == 0.0


def test_training_reduces_loss_and_clips(tmp_path):
    seen = []
    res = tr.Trainer(ToyTask(), _cfg(steps=40, grad_clip=0.05), str(tmp_path),
                     on_progress=lambda s, n, m: seen.append((s, m))).run()
    assert res.step == 40
    first, last = seen[0][1], seen[-1][1]
    assert last["loss"] < 0.5 * first["loss"]
    # the gradient norm is logged before clipping; the applied update respects the clip
    assert max(m["grad_norm"] for _, m in seen) > 0.05
    ck = tr.load_checkpoint(res.checkpoint)
    assert ck["step"] == 40 and ck["stage"] == "toy" and ck["model_config"]["hidden"] == 8
    assert set(ck) >= {"model", "ema", "optimizer", "rng", "data_position", "train_config", "lineage", "task_state"}
    assert ck["task_state"] == [{"seen": 40 * 8}]
    assert ck["data_position"]["micro_batches"] == 40
    # real TensorBoard event files with the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"toy/loss", "toy/lr", "toy/grad_norm", "toy/samples_per_s"} <= tags
    assert [e.step for e in acc.Scalars("toy/loss")] == list(range(2, 41, 2))
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 40


def test_compiled_steps_train_the_same_weights_and_checkpoint_the_plain_names(tmp_path):
    """``compile``: the loss's forward and backward go through torch.compile (graphs are compiled), the
    weights follow the eager run's, and the checkpoint's names are the module's own (no ``_orig_mod``)."""
    torch._dynamo.reset()
    eager = tr.Trainer(ToyTask(), _cfg(steps=4), str(tmp_path / "eager")).run()
    compiled = tr.Trainer(ToyTask(), _cfg(steps=4, compile=True), str(tmp_path / "compiled")).run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert eager.step == compiled.step == 4
    a, b = tr.load_checkpoint(eager.checkpoint), tr.load_checkpoint(compiled.checkpoint)
    assert list(a["model"]) == list(b["model"]) and list(a["ema"]) == list(b["ema"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a = tr.Trainer(ToyTask(), _cfg(steps=3, grad_accum=1, ema_decay=None), str(tmp_path / "a")).run()
    b = tr.Trainer(_SplitToy(), _cfg(steps=3, grad_accum=2, ema_decay=None), str(tmp_path / "b")).run()
    wa, wb = _weights(str(tmp_path / "a")), _weights(str(tmp_path / "b"))
    assert a.step == b.step == 3
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


class _SplitToy(ToyTask):
    """The same global batches as ToyTask, delivered as two half micro-batches each."""

    def batches(self, micro_batch, start, ctx):
        index = start // 2
        while True:
            x, y = self.global_batch(index, micro_batch * 2)
            yield index, x[:micro_batch], y[:micro_batch]
            yield index, x[micro_batch:], y[micro_batch:]
            index += 1


def test_resume_continues_to_the_same_weights(tmp_path):
    full = tr.Trainer(ToyTask(), _cfg(), str(tmp_path / "full")).run()
    # the same run stopped by a NaN at step 6 keeps its step-4 checkpoint, then resumes without it
    with pytest.raises(tr.NonFiniteLossError, match="step 6.*last good checkpoint is .*step-00000004.pt"):
        tr.Trainer(ToyTask(nan_at=6), _cfg(), str(tmp_path / "cut")).run()
    assert tr.load_step(str(tmp_path / "cut")) == 4
    resumed = tr.Trainer(ToyTask(), _cfg(), str(tmp_path / "cut")).run()
    assert resumed.resumed_from == 4 and resumed.step == 12
    a, b = tr.load_checkpoint(full.checkpoint), tr.load_checkpoint(resumed.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert a["task_state"] == b["task_state"]
    # a finished run resumed does nothing
    again = tr.Trainer(ToyTask(), _cfg(), str(tmp_path / "cut")).run()
    assert again.step == 12 and again.resumed_from == 12
    assert len(glob.glob(str(tmp_path / "cut" / "checkpoints" / "*.pt"))) == 2  # keep_checkpoints


class _BoundedToy(ToyTask):
    """A task with a constraint on its weights, applied after each optimiser step (as CLIP bounds its
    logit scale)."""

    calls = 0

    def after_step(self, model):
        self.calls += 1
        model[0].weight.clamp_(-0.05, 0.05)  # in place on a leaf: only allowed under no_grad


def test_after_step_constrains_the_weights_before_the_ema_sees_them(tmp_path):
    task = _BoundedToy()
    res = tr.Trainer(task, _cfg(ema_decay=0.0), str(tmp_path)).run()  # decay 0: the EMA is the last weights
    ck = tr.load_checkpoint(res.checkpoint)
    assert task.calls == 12 and ck["model"]["0.weight"].abs().max() <= 0.05
    assert torch.equal(ck["ema"]["module.0.weight"], ck["model"]["0.weight"])


def test_a_checkpoint_resumes_only_on_the_number_of_processes_that_wrote_it(tmp_path):
    res = tr.Trainer(ToyTask(), _cfg(steps=4, checkpoint_every=2), str(tmp_path)).run()
    state = tr.load_checkpoint(res.checkpoint)
    state["data_position"]["world_size"] = 2  # as a 2-process run would have written it
    torch.save(state, res.checkpoint)
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1"):
        tr.Trainer(ToyTask(), _cfg(steps=8, checkpoint_every=2), str(tmp_path)).run()


class _EvalToy(EvalToyTask):
    """A held-out evaluation that also draws from the global RNGs, as a real one may."""

    def evaluate(self, model):
        noise = torch.randn(1).item()  # would shift every later draw if the trainer did not restore the RNG
        return {**super().evaluate(model), "noise": noise, "label": "not a number"}


class _Masked(torch.nn.Module):
    """A layer with a constant -inf buffer outside the state dict, like open_clip's causal mask."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d, d)
        self.register_buffer("mask", torch.tensor([0.0] + [float("-inf")] * (d - 1)), persistent=False)

    def forward(self, x):
        return self.linear(x) + self.mask.exp()


class _MaskedEvalToy(_EvalToy):
    def build_model(self, cfg):
        self.built = torch.nn.Sequential(super().build_model(cfg), _Masked(cfg["d_out"]))
        return self.built


def test_the_ema_copies_constant_buffers_instead_of_averaging_them(tmp_path):
    t = tr.Trainer(_MaskedEvalToy(), _cfg(eval_every=4), str(tmp_path))
    t.run()
    assert [e["step"] for e in t.eval_history()] == [4, 8, 12]
    assert all(math.isfinite(e["mse"]) for e in t.eval_history())  # averaging -inf with -inf gives NaN


def test_periodic_evaluation_is_logged_and_changes_nothing_in_the_training(tmp_path):
    plain = tr.Trainer(ToyTask(), _cfg(), str(tmp_path / "plain")).run()
    evaluated = tr.Trainer(_EvalToy(), _cfg(eval_every=3), str(tmp_path / "eval")).run()
    a, b = tr.load_checkpoint(plain.checkpoint), tr.load_checkpoint(evaluated.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    history = json.loads((tmp_path / "eval" / "eval_history.json").read_text())
    assert [e["step"] for e in history] == [3, 6, 9, 12]  # and the last step
    assert history[-1]["mse"] < history[0]["mse"] and "label" not in history[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "eval" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("toy/eval/mse")] == [3, 6, 9, 12]
    # a run stopped in step 7 (checkpoint 4) forgets its evaluation at 6 and makes it again
    with pytest.raises(tr.NonFiniteLossError, match="step 6"):
        tr.Trainer(_EvalToy(nan_at=6), _cfg(eval_every=3), str(tmp_path / "cut")).run()
    assert [e["step"] for e in json.loads((tmp_path / "cut" / "eval_history.json").read_text())] == [3, 6]
    resumed = tr.Trainer(_EvalToy(), _cfg(eval_every=3), str(tmp_path / "cut"))
    resumed.run()
    assert [(e["step"], e["mse"]) for e in resumed.eval_history()] == [(e["step"], e["mse"]) for e in history]


def test_async_checkpoints_hold_the_state_of_their_step(tmp_path, monkeypatch):
    # written by a thread while training goes on: each file must hold its own step's state, as a
    # synchronous write would; a slow write lets training run several steps meanwhile
    real_save = torch.save

    def slow_save(obj, f, *a, **kw):
        time.sleep(0.3)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", slow_save)
    for mode in ("sync", "async"):
        tr.Trainer(ToyTask(), _cfg(async_checkpoint=mode == "async", keep_checkpoints=10), str(tmp_path / mode)).run()
    names = sorted(p.name for p in (tmp_path / "sync" / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (tmp_path / "async" / "checkpoints").glob("*.pt"))
    assert names == ["step-00000004.pt", "step-00000008.pt", "step-00000012.pt"]
    for name in names:
        a = tr.load_checkpoint(str(tmp_path / "sync" / "checkpoints" / name))
        b = tr.load_checkpoint(str(tmp_path / "async" / "checkpoints" / name))
        for part in ("model", "ema"):
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (name, part, k)
        for k, st in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in st.items() if torch.is_tensor(v))
    assert json.loads((tmp_path / "async" / "checkpoints" / "latest.json").read_text())["step"] == 12


def test_nan_loss_stops_with_a_clear_error_and_no_new_checkpoint(tmp_path):
    with pytest.raises(tr.NonFiniteLossError, match="loss is nan.*step 1;.*none"):
        tr.Trainer(ToyTask(nan_at=1), _cfg(), str(tmp_path)).run()
    assert tr.latest_checkpoint(str(tmp_path)) is None


def test_batch_must_split_over_processes_and_accumulation():
    with pytest.raises(ValueError, match="batch_size 6 does not split into 2 micro-batches over 4 processes"):
        from unclip.train.distributed import DistContext

        tr.Trainer(ToyTask(), _cfg(batch_size=6, grad_accum=2), "/tmp/x", ctx=DistContext(0, 4, 0, torch.device("cpu")))


@pytest.mark.slow
def test_fsdp_on_one_process_evaluates_and_trains_on(tmp_path):
    """FSDP on one process trains and evaluates (on a gathered plain copy, as with more processes)."""
    cfg = _cfg(steps=3, checkpoint_every=10, eval_every=1)
    launch(LaunchConfig(nproc_per_node=1, backend="gloo", strategy="fsdp"), "toy_task",
           ["--out", str(tmp_path), "--config", cfg.model_dump_json(), "--strategy", "fsdp", "--evaluate"],
           log_path=str(tmp_path / "one.log"), env=ENV, timeout_s=180)
    history = json.loads((tmp_path / "eval_history.json").read_text())
    assert [e["step"] for e in history] == [1, 2, 3] and tr.load_step(str(tmp_path)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(strategy, tmp_path):
    cfg = _cfg(steps=4, checkpoint_every=2, eval_every=2)
    one = tr.Trainer(EvalToyTask(), cfg, str(tmp_path / "one"))
    a = tr.load_checkpoint(one.run().checkpoint)

    def two_processes(ema_shift: float = 0.0) -> None:
        launch(LaunchConfig(nproc_per_node=2, backend="gloo", strategy=strategy), "toy_task",
               ["--out", str(tmp_path / "two"), "--config", cfg.model_dump_json(), "--strategy", strategy,
                "--evaluate"], log_path=str(tmp_path / "two.log"), env=ENV, timeout_s=180)
        # the evaluations during training, of the EMA's full weights (under FSDP gathered from the shards)
        history = json.loads((tmp_path / "two" / "eval_history.json").read_text())
        assert [e["step"] for e in history] == [e["step"] for e in one.eval_history()] == [2, 4]
        if not ema_shift:
            for e, want in zip(history, one.eval_history()):
                assert e["mse"] == pytest.approx(want["mse"], rel=1e-5, abs=1e-7), e
        b = tr.load_checkpoint(tr.latest_checkpoint(str(tmp_path / "two")))
        assert b["step"] == 4 and b["data_position"]["world_size"] == 2 and len(b["rng"]) == 2
        # the ranks draw their own random numbers (one seed would give every rank the same noise)
        assert not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
        for part, shift in (("model", 0.0), ("ema", ema_shift)):  # full tensors, not one rank's FSDP shards
            assert b[part].keys() == a[part].keys()
            for k in a[part]:
                assert type(b[part][k]) is torch.Tensor, (part, k)
                want = a[part][k] + shift if k.startswith("module.") else a[part][k]
                torch.testing.assert_close(b[part][k], want, atol=1e-6, rtol=1e-5, msg=f"{part} {k}")

    two_processes()
    # Resumed from the step-2 checkpoint with 1 added to its EMA weights: each rank loads its shard of
    # them and of the update count, so the two EMA updates left keep min(0.9, (1 + n) / (10 + n)) of the
    # shift at n = 2 and 3 (a run that restarted, or lost the EMA or its count, would not)
    ckpts = tr.checkpoint_dir(str(tmp_path / "two"))
    step2 = storage.join(ckpts, "step-00000002.pt")
    state = tr.load_checkpoint(step2)
    state["ema"] = {k: v + 1.0 if k.startswith("module.") else v for k, v in state["ema"].items()}
    torch.save(state, step2)
    storage.write_json(storage.join(ckpts, "latest.json"), {"checkpoint": step2, "step": 2})
    two_processes(ema_shift=(3 / 12) * (4 / 13))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_steps_under_two_processes_match_one_eager_process(strategy, tmp_path):
    ref = tr.load_checkpoint(tr.Trainer(ToyTask(), _cfg(steps=4), str(tmp_path / "one")).run().checkpoint)
    cfg = _cfg(steps=4, compile=True)
    launch(LaunchConfig(nproc_per_node=2, backend="gloo", strategy=strategy), "toy_task",
           ["--out", str(tmp_path / "two"), "--config", cfg.model_dump_json(), "--strategy", strategy],
           log_path=str(tmp_path / "two.log"), env=ENV, timeout_s=300)
    got = tr.load_checkpoint(tr.latest_checkpoint(str(tmp_path / "two")))
    assert got["step"] == 4 and list(got["model"]) == list(ref["model"])
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_one(mode, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", save_failing_at(8))  # a full disk at step 8's checkpoint
    # sync: raised at step 8's save; async: as soon as the trainer sees it (step 8's save or step 12's)
    with pytest.raises(RuntimeError, match="train.toy: writing a checkpoint failed: .*No space left on device"):
        tr.Trainer(ToyTask(), _cfg(async_checkpoint=mode == "async", keep_checkpoints=10), str(tmp_path)).run()
    assert tr.load_step(str(tmp_path)) == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["step-00000004.pt"]


def test_a_failure_during_a_checkpoint_write_also_reports_the_write(tmp_path, monkeypatch):
    # the step-4 checkpoint's write (a thread) fails while steps 5-6 run; step 6's loss is NaN: the NaN
    # error names step 4 as the last good checkpoint, and its note says that write failed
    # it fails after steps 5-6 (milliseconds each), not before step 4's save returns
    monkeypatch.setattr(torch, "save", save_failing_at(4, delay_s=0.5))
    with pytest.raises(tr.NonFiniteLossError, match="step 6") as info:
        tr.Trainer(ToyTask(nan_at=6), _cfg(async_checkpoint=True), str(tmp_path)).run()
    want = "train.toy: writing a checkpoint failed too: OSError(28, 'No space left on device'); the last whole " \
           "checkpoint is none"
    assert info.value.__notes__ == [want]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_checkpoint_that_cannot_be_started_stops_the_run(mode, tmp_path, monkeypatch):
    # a failure on rank 0 before the write (the snapshot's copy, the thread) is raised as a write's is
    def fail(*args, **kwargs):
        raise MemoryError("no room for the state")

    if mode == "async":
        monkeypatch.setattr(tr, "_tree_clone", fail)  # the snapshot the thread writes
    else:
        monkeypatch.setattr(StageTrainConfig, "model_dump", fail)  # part of the state itself
    with pytest.raises(RuntimeError, match="train.toy: writing a checkpoint failed: MemoryError"):
        tr.Trainer(ToyTask(), _cfg(async_checkpoint=mode == "async"), str(tmp_path)).run()
    assert tr.latest_checkpoint(str(tmp_path)) is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_checkpoint_write_that_fails_on_rank_0_stops_every_rank_with_its_error(mode, tmp_path):
    # only rank 0 writes; without passing its error on, rank 1 would wait in the next collective until
    # torchrun's agent killed it, and its log would not say why (async: at step 8's save or step 12's)
    cfg = _cfg(steps=12, checkpoint_every=4, async_checkpoint=mode == "async")
    with pytest.raises(LaunchError):
        launch(LaunchConfig(nproc_per_node=2, backend="gloo", strategy="ddp"), "toy_task",
               ["--out", str(tmp_path / "two"), "--config", cfg.model_dump_json(), "--strategy", "ddp",
                "--fail-checkpoint-at", "8"], log_path=str(tmp_path / "two.log"), env=ENV, timeout_s=120)
    log = (tmp_path / "two.log").read_text()
    assert "RuntimeError: train.toy: writing a checkpoint failed: OSError(28, 'No space left on device')" in log
    assert "RuntimeError: rank 0 stopped: train.toy: writing a checkpoint failed" in log
    assert tr.load_step(str(tmp_path / "two")) == 4


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    cfg = _cfg(steps=10, checkpoint_every=3)
    ref = tr.Trainer(ToyTask(), cfg, str(tmp_path / "ref")).run()
    cmd = [sys.executable, "-m", "toy_task", "--out", str(tmp_path / "k"), "--config", cfg.model_dump_json(),
           "--stall-at", "7"]
    proc = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"stalled"
    # the step-6 checkpoint is written by a thread while step 7 runs: killed before it is whole, the run
    # would resume from step 3 (also correct); this test kills after it
    deadline = time.monotonic() + 60
    while tr.load_step(str(tmp_path / "k")) != 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert tr.load_step(str(tmp_path / "k")) == 6
    subprocess.run(cmd[:-2], env={**os.environ, **ENV}, check=True, timeout=120)
    a, b = tr.load_checkpoint(ref.checkpoint), tr.load_checkpoint(tr.latest_checkpoint(str(tmp_path / "k")))
    assert b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    # rank 0 alone is signalled during its 6th micro-batch; rank 1 learns of it through the step's
    # all-reduce, and both take part in the exit checkpoint of step 6 (FSDP's gather is a collective)
    cfg = _cfg(steps=12, checkpoint_every=4)
    with pytest.raises(LaunchError):
        launch(LaunchConfig(nproc_per_node=2, backend="gloo", strategy="fsdp"), "toy_task",
               ["--out", str(tmp_path / "two"), "--config", cfg.model_dump_json(), "--strategy", "fsdp",
                "--sigterm-at", "5"], log_path=str(tmp_path / "two.log"), env=ENV, timeout_s=120)
    log = (tmp_path / "two.log").read_text()
    assert "stopped by signal 15 at step 6" in log and "stopped by a signal to another process at step 6" in log
    assert tr.load_step(str(tmp_path / "two")) == 6
    state = tr.load_checkpoint(tr.latest_checkpoint(str(tmp_path / "two")))
    assert state["step"] == 6 and len(state["rng"]) == 2


def test_sigterm_writes_an_exit_checkpoint(tmp_path):
    task = ToyTask()
    original = task.loss

    def loss(model, batch):
        if batch[0] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(model, batch)

    task.loss = loss
    with pytest.raises(KeyboardInterrupt, match="stopped by signal"):
        tr.Trainer(task, _cfg(), str(tmp_path)).run()
    assert tr.load_step(str(tmp_path)) == 6
    time.sleep(0)
    # a signal during the last step: every step ran, the message says so, and a resume only returns
    task = ToyTask(sigterm_at=11)
    with pytest.raises(KeyboardInterrupt, match=r"after its last step \(12\): training is complete"):
        tr.Trainer(task, _cfg(), str(tmp_path / "last")).run()
    assert tr.Trainer(ToyTask(), _cfg(), str(tmp_path / "last")).run().step == 12
