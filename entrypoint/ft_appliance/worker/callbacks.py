"""The appliance's TrainerCallbacks, one concern each, sharing one WorkerContext:

- StepCallback: real-token count, the per-step stop vote, step and log records, train_begin.
- BeatCallback: tells the beat thread what rank 0 is busy with between steps (evaluate, save).
- MarkerCallback: after every rank saved, the completion marker; the stop checkpoint's record.
- TweaksCallback: the profile's changes to the loaded model (no LlamaFactory key exists for them).
- TraceCallback: FT_TRACE_STEPS, torch.profiler over a few steps for benchmarks/.

Defined inside build_callbacks so that transformers is imported only in workers. The Trainer calls
them in list order after its own DefaultFlowCallback, so on_step_end already sees should_save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..state import checkpoints
from ..state.layout import StateDir, append_record, write_record
from ..state.records import (
    BLOCKDIAG_ATTENTION,
    LORA_ADD_IN_GEMM,
    LORA_INPUTS,
    Event,
    LogRecord,
    StepRecord,
    StopRecord,
)
from .beat import Beat
from .counting import StepTrace, TokenCount


class StopRequested(Exception):
    """Raised inside the Trainer once the stop checkpoint is on disk; unwinds training cleanly."""


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signum = signum


@dataclass
class WorkerContext:
    sd: StateDir
    attempt: int
    rank: int
    stop: StopFlag
    beat: Beat
    tweaks: tuple[str, ...] = ()
    stopping: bool = False
    trained: bool = False
    """This attempt finished a step: a failure from now on is a training failure, not a setup one."""
    tokens: TokenCount = field(default_factory=TokenCount)

    def event(self, name: str, **data: Any) -> None:
        if self.rank == 0:
            append_record(self.sd.events, Event(name, self.attempt, time.time(), data))


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def build_callbacks(ctx: WorkerContext) -> list[Any]:
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def __init__(self) -> None:
            self.step_started = time.monotonic()
            self._vote_group: Any = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is not None:
                model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
            if ctx.stop.signum:
                raise StopRequested(f"stop requested before step {state.global_step + 1}")
            self.step_started = time.monotonic()
            ctx.event("train_begin", step=state.global_step, max_steps=state.max_steps)

        def _count_tokens(self, _module: Any, args: tuple, kwargs: dict) -> None:
            # Real (non-padding) tokens, counted here: the Trainer's counter includes padding under
            # packing and overflows under neat_packing.
            import torch

            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if mask is not None and hasattr(mask, "dim") and mask.dim() == 2:
                ctx.tokens.add((mask > 0).sum())
            elif mask is not None and hasattr(mask, "dim") and mask.dim() == 4:
                # neat_packing's block-diagonal mask: a real token attends to itself, padding to nothing.
                diag = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)
                ctx.tokens.add((diag if diag.dtype == torch.bool else diag == 0).sum())
            elif ids is not None and hasattr(ids, "numel"):
                ctx.tokens.add(ids.numel())

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
            stop_votes, tokens = self._all_reduce([1.0 if ctx.stop.signum else 0.0, float(ctx.tokens.take())])
            now = time.monotonic()
            if ctx.rank == 0:
                append_record(ctx.sd.steps, self._record(state, int(tokens), now))
            ctx.trained = True
            self.step_started = now
            if stop_votes > 0 and not ctx.stopping:
                ctx.stopping = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def _record(self, state: Any, tokens: int, now: float) -> StepRecord:
            import torch

            mem = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
            return StepRecord(
                attempt=ctx.attempt,
                step=state.global_step,
                max_steps=state.max_steps,
                tokens=tokens,
                seconds=round(now - self.step_started, 4),
                time=time.time(),
                first=not ctx.trained,
                mem_reserved=mem,
            )

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if ctx.rank == 0 and logs:
                numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k in _LOG_KEYS}
                append_record(ctx.sd.log, LogRecord(ctx.attempt, state.global_step, time.time(), **numbers))

    class BeatCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            ctx.beat.enter("train", state.global_step)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            busy = "evaluate" if control.should_evaluate else "save" if control.should_save else "train"
            ctx.beat.enter(busy, state.global_step)

        def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001
            ctx.beat.enter("save" if control.should_save else "train", state.global_step)

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            ctx.beat.enter("train", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            ctx.beat.enter("final-save", state.global_step)  # LlamaFactory saves the model after train()

    class MarkerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.save_started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.save_started = time.monotonic()

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            dist = _dist()
            if dist is not None:
                dist.barrier()  # every rank has finished writing its part once all pass here
            if ctx.rank == 0 and ckpt.is_dir():
                checkpoints.write_marker(ckpt, step=state.global_step, world_size=args.world_size)
                ctx.event("save", step=state.global_step, seconds=round(time.monotonic() - self.save_started, 3))
            if ctx.stopping:
                if ctx.rank == 0:
                    write_record(ctx.sd.stopped, StopRecord(ctx.attempt, state.global_step, str(ckpt), time.time()))
                if dist is not None:
                    dist.barrier()
                raise StopRequested(f"stopped after saving {ckpt}")
            return control

    class TweaksCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if model is not None and ctx.tweaks:
                done = apply_tweaks(model, ctx.tweaks)
                if ctx.rank == 0:
                    for name, what in done.items():
                        print(f"[ft-appliance worker] {name}: {what}", flush=True)
                    ctx.event("tweaks", **done)

    class TraceCallback(TrainerCallback):
        def __init__(self, trace: StepTrace) -> None:
            self.trace = trace

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.trace.maybe_start(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.trace.maybe_stop(state.global_step)

    found: list[Any] = [StepCallback(), BeatCallback(), MarkerCallback(), TweaksCallback()]
    trace = StepTrace.from_env(ctx.rank)
    return [*found, TraceCallback(trace)] if trace else found


_LOG_KEYS = frozenset({"loss", "learning_rate", "eval_loss", "epoch"})


def apply_tweaks(model: Any, tweaks: tuple[str, ...]) -> dict[str, str]:
    """After loading: LlamaFactory has no keys for these (policy/profile.py explains each)."""
    from . import attention, lora

    done: dict[str, str] = {}
    if BLOCKDIAG_ATTENTION in tweaks:
        if attention.flex_available():
            attention.register()
            done[BLOCKDIAG_ATTENTION] = f"{attention.use_blockdiag(model)} -> {attention.NAME}"
        else:
            done[BLOCKDIAG_ATTENTION] = "skipped: FlexAttention unavailable, SDPA kept"
    if LORA_INPUTS in tweaks:
        done[LORA_INPUTS] = f"{lora.keep_lora_inputs_in_compute_dtype(model)} LoRA layers"
    if LORA_ADD_IN_GEMM in tweaks:
        done[LORA_ADD_IN_GEMM] = f"{lora.add_lora_in_gemm(model)} LoRA layers"
    return done
