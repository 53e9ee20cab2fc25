"""The appliance's TrainerCallbacks, one concern each, sharing one WorkerContext:

- StepCallback: real-token count, the per-step stop vote, step and log records, train_begin.
- BeatCallback: tells the beat thread what rank 0 is busy with between steps (evaluate, save).
- MarkerCallback: after every rank saved (and a background write ended), the completion marker;
  the stop checkpoint's record.
- TweaksCallback: the profile's changes to the loaded model (no LlamaFactory key exists for them).
- TraceCallback: FT_TRACE_STEPS, torch.profiler over a few steps for benchmarks/.

Only workers import this module (it imports transformers). The Trainer calls the callbacks in list
order after its own DefaultFlowCallback, so on_step_end already sees should_save.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..state import checkpoints
from ..state.layout import append_record, write_record
from ..state.records import (
    BLOCKDIAG_ATTENTION,
    FP8_BASE,
    LIGER_LOSS_NO_SYNC,
    LORA_ADD_IN_GEMM,
    LORA_FUSED,
    LORA_INPUTS,
    LogRecord,
    StepRecord,
    StopRecord,
)
from .context import StopRequested, WorkerContext
from .counting import StepTrace


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class StepCallback(TrainerCallback):
    """Real-token count, the per-step stop vote, step and log records, train_begin."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.step_started = time.monotonic()
        self._vote_group: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if model is not None:
            model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        if self.ctx.stop.signum:
            raise StopRequested(f"stop requested before step {state.global_step + 1}")
        self.step_started = time.monotonic()
        self.ctx.event(
            "train_begin", step=state.global_step, max_steps=state.max_steps, setup=dict(self.ctx.setup_seconds)
        )

    def _count_tokens(self, _module: Any, args: tuple, kwargs: dict) -> None:
        # Real (non-padding) tokens, counted here: the Trainer's counter includes padding under
        # packing and overflows under neat_packing.
        import torch

        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and hasattr(mask, "dim") and mask.dim() == 2:
            self.ctx.tokens.add((mask > 0).sum())
        elif mask is not None and hasattr(mask, "dim") and mask.dim() == 4:
            # neat_packing's block-diagonal mask: a real token attends to itself, padding to nothing.
            diag = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)
            self.ctx.tokens.add((diag if diag.dtype == torch.bool else diag == 0).sum())
        elif ids is not None and hasattr(ids, "numel"):
            self.ctx.tokens.add(ids.numel())

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch

        dist = _dist()
        if dist is None or dist.get_world_size() == 1:
            return values
        if self._vote_group is None:
            # On the CPU: a vote through NCCL would queue behind the step's kernels and wait for all
            # of them. Every rank reaches the first step end, so the collective creation is safe.
            self._vote_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self._vote_group)
        return t.tolist()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        # One small all-reduce per step: every rank agrees on a stop at the same step boundary.
        stop_votes, tokens = self._all_reduce([1.0 if self.ctx.stop.signum else 0.0, float(self.ctx.tokens.take())])
        now = time.monotonic()
        if self.ctx.rank == 0:
            append_record(self.ctx.sd.steps, self._record(state, int(tokens), now))
        self.ctx.trained = True
        self.step_started = now
        if stop_votes > 0 and not self.ctx.stopping:
            self.ctx.stopping = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def _record(self, state: Any, tokens: int, now: float) -> StepRecord:
        import torch

        mem = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
        return StepRecord(
            attempt=self.ctx.attempt,
            step=state.global_step,
            max_steps=state.max_steps,
            tokens=tokens,
            seconds=round(now - self.step_started, 4),
            time=time.time(),
            first=not self.ctx.trained,
            mem_reserved=mem,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.ctx.rank == 0 and logs:
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k in _LOG_KEYS}
            append_record(self.ctx.sd.log, LogRecord(self.ctx.attempt, state.global_step, time.time(), **numbers))


class BeatCallback(TrainerCallback):
    """Tells the beat thread what rank 0 is busy with between steps."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.ctx.beat.enter("train", state.global_step)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        busy = "evaluate" if control.should_evaluate else "save" if control.should_save else "train"
        self.ctx.beat.enter(busy, state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001
        self.ctx.beat.enter("save" if control.should_save else "train", state.global_step)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        self.ctx.beat.enter("train", state.global_step)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.ctx.beat.enter("final-save", state.global_step)  # LlamaFactory saves the model after train()


class MarkerCallback(TrainerCallback):
    """After every rank saved: the completion marker; and the stop checkpoint's record."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.save_started = time.monotonic()
        self.last_size = 0
        """Bytes of the last checkpoint this rank marked (what the next save will roughly need)."""
        self.prepared = False

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001
        self.save_started = time.monotonic()
        saver = self.ctx.saver
        if saver is not None and self.ctx.rank == 0 and not self.prepared and model is not None and optimizer:
            self.prepared = True  # the optimizer has its state after the first step: lay out the copies now
            saver.prepare({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        if control.should_save and self.ctx.rank == 0 and self.last_size:
            free = shutil.disk_usage(args.output_dir).free
            if free < self.last_size:  # the volume fills in the save: say so before, not after
                print(
                    f"[ft-appliance worker] warning: {free / 2**20:.0f} MiB free on the output volume, the last "
                    f"checkpoint took {self.last_size / 2**20:.0f} MiB: the next save may not fit",
                    flush=True,
                )
                self.ctx.event("low_space", step=state.global_step, free=free, needed=self.last_size)

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        dist = _dist()
        if dist is not None:
            dist.barrier()  # every rank has finished writing its part once all pass here
        saver = self.ctx.saver
        if self.ctx.rank == 0 and ckpt.is_dir():
            mark = self._marking(args, ckpt, state.global_step, state.best_model_checkpoint)
            if saver is not None and saver.jobs:
                saver.start(mark)  # the weights and the optimizer are still being written
            else:
                mark()
        if self.ctx.stopping:
            if saver is not None:
                saver.wait()
            if self.ctx.rank == 0:
                write_record(
                    self.ctx.sd.stopped, StopRecord(self.ctx.attempt, state.global_step, str(ckpt), time.time())
                )
            if dist is not None:
                dist.barrier()
            raise StopRequested(f"stopped after saving {ckpt}")
        return control

    def _marking(self, args: Any, ckpt: Path, step: int, best: str | None) -> Callable[[], None]:
        """The marker, the save event and the rotation, for now or for the background writer's end.
        Everything it needs is taken now: by the time a background write ends, training has moved on."""
        started, stalled = self.save_started, time.monotonic() - self.save_started

        def mark() -> None:
            self.last_size = checkpoints.write_marker(ckpt, step=step, world_size=args.world_size)
            seconds = round(time.monotonic() - started, 3)
            self.ctx.event("save", step=step, seconds=seconds, stalled=min(seconds, round(stalled, 3)))
            if self.ctx.keep_checkpoints:
                gone = checkpoints.rotate(Path(args.output_dir), self.ctx.keep_checkpoints, best)
                if gone:
                    self.ctx.event("rotate", step=step, deleted=gone)

        return mark

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.ctx.saver is not None:
            self.ctx.saver.wait()  # the last checkpoint is marked before LlamaFactory's final save


class TweaksCallback(TrainerCallback):
    """The profile's changes to the loaded model."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        # FT_SKIP_TWEAKS (comma-separated names): benchmarks/ and tests measure one tweak against the
        # rest of the profile in one run of the same config.
        skip = set(os.environ.get("FT_SKIP_TWEAKS", "").split(","))
        tweaks = tuple(t for t in self.ctx.tweaks if t not in skip)
        if model is not None and tweaks:
            done = apply_tweaks(model, tweaks)
            if self.ctx.rank == 0:
                for name, what in done.items():
                    print(f"[ft-appliance worker] {name}: {what}", flush=True)
                self.ctx.event("tweaks", **done)


class TraceCallback(TrainerCallback):
    def __init__(self, trace: StepTrace) -> None:
        self.trace = trace

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.trace.maybe_start(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.trace.maybe_stop(state.global_step, model)


def markers_last() -> None:
    """Make the completeness marker the last write of every save, whatever other callbacks do.

    LlamaFactory's rm and ppo trainers add FixValueHeadModelCallback after the callbacks handed to
    run_exp; its on_save replaces model.safetensors with the adapter and value_head.safetensors, so a
    marker written before it lists files that are gone, and every rm checkpoint was judged torn. The
    Trainer calls callbacks in list order, so each event first moves ours to the end (a stable sort:
    the others keep their order)."""
    from transformers.trainer_callback import CallbackHandler

    if getattr(CallbackHandler, "_ft_markers_last", False):
        return
    original = CallbackHandler.call_event

    def call_event(self, event, args, state, control, **kwargs):  # noqa: ANN001, ANN202
        self.callbacks.sort(key=lambda cb: isinstance(cb, MarkerCallback))
        return original(self, event, args, state, control, **kwargs)

    CallbackHandler.call_event = call_event
    CallbackHandler._ft_markers_last = True


def build_callbacks(ctx: WorkerContext) -> list[Any]:
    from . import valuehead

    markers_last()
    valuehead.install()  # acts only on a value-head model resuming a value-head checkpoint
    found: list[Any] = [StepCallback(ctx), BeatCallback(ctx), MarkerCallback(ctx), TweaksCallback(ctx)]
    trace = StepTrace.from_env(ctx.rank)
    return [*found, TraceCallback(trace)] if trace else found


_LOG_KEYS = frozenset({"loss", "learning_rate", "eval_loss", "epoch"})


def apply_tweaks(model: Any, tweaks: tuple[str, ...]) -> dict[str, str]:
    """After loading: LlamaFactory has no keys for these (policy/profile.py explains each)."""
    from . import attention, fp8, liger, lora, lora_fused

    done: dict[str, str] = {}
    if BLOCKDIAG_ATTENTION in tweaks:
        if kernels := attention.register():
            names = ", then ".join(k.name for k in kernels)
            # FT_HOST_PIECES=1: opt-in until a card has measured it (docs/benchmarks.md, 2026-12-06)
            host = os.environ.get("FT_HOST_PIECES") == "1" and attention.install_host_layouts()
            ahead = "; pieces from the host" if host else ""
            done[BLOCKDIAG_ATTENTION] = f"{attention.use_blockdiag(model)} -> {attention.NAME} ({names}{ahead})"
        else:
            done[BLOCKDIAG_ATTENTION] = "skipped: no varlen or FlexAttention kernel here, SDPA kept"
    if LORA_INPUTS in tweaks:
        done[LORA_INPUTS] = f"{lora.keep_lora_inputs_in_compute_dtype(model)} LoRA layers"
    if LORA_FUSED in tweaks:  # first: add_lora_in_gemm then takes only the layers it left
        done[LORA_FUSED] = f"{lora_fused.fuse_lora_projections(model)} LoRA layers"
    if LORA_ADD_IN_GEMM in tweaks:
        done[LORA_ADD_IN_GEMM] = f"{lora.add_lora_in_gemm(model)} LoRA layers"
    if FP8_BASE in tweaks:
        done[FP8_BASE] = f"{fp8.use_float8_base(model)} frozen base layers in float8"
    if LIGER_LOSS_NO_SYNC in tweaks:
        done[LIGER_LOSS_NO_SYNC] = "patched" if liger.drop_loss_backward_sync() else "skipped: Liger not found"
    return done
