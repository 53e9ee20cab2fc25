"""Batch autotune in the workers (policy/autotune.py decides), inside Trainer.training_step.

At the attempt's first micro-batch every rank times forward and backward of each candidate size on
the loaded model and the run's first examples (collated as the run collates them), and the ranks
agree on the slowest time and the highest peak. No extra launch, no second model load: a first start
pays seconds. The RNG state is put back, and the gradients are dropped, so training is unchanged.

The run then trains with the winner by regrouping the config's micro-batches: k of them joined into
one forward (merge), or each cut in k (split). The data order, the effective batch and the loss are
those of the config: transformers normalises the loss by the step's token count (num_items_in_batch),
so one forward over two micro-batches gives the sum of their two losses. Where it does not (a model
that takes no loss arguments), the config's micro-batch is kept.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy.autotune import cached, decide, next_probe, regroup
from ..state import files
from ..state.records import AutotuneDecision, AutotuneRequest, MicroProbe
from .context import WorkerContext

PASSES = 1
"""Timed forward and backward passes per size, after one untimed (kernels compile and autotune). One
pass of a real micro-batch (0.5-1 s on an H200) varies far less than the 2% the decision needs."""


@dataclass
class Regrouper:
    request: AutotuneRequest
    ctx: WorkerContext
    mode: str = ""
    """"" until the first micro-batch decides; then keep, merge or split (policy.autotune.regroup)."""
    k: int = 1
    stash: list[Any] = field(default_factory=list)

    def step(self, trainer: Any, model: Any, inputs: Any, n: Any, original: Any) -> Any:
        if not self.mode:
            self._decide(trainer)
        if self.mode == "merge":
            self.stash.append(inputs)
            if len(self.stash) < self.k and not trainer.accelerator.sync_gradients:
                return _zero(trainer)  # its examples ride in the group's forward
            group, self.stash = self.stash, []
            merged = concat(group)
            if merged is None:  # keys that cannot be joined: one forward each, synchronised once
                return _pieces(trainer, model, group, n, original)
            return original(trainer, model, merged, n)
        if self.mode == "split":
            return _pieces(trainer, model, split(inputs, self.k), n, original)
        return original(trainer, model, inputs, n)

    def _decide(self, trainer: Any) -> None:
        r = self.request
        decision = cached(files.read_json(Path(r.cache)), r.key, r.per_device, r.grad_accum)
        if not _same_everywhere(trainer, decision.micro if decision else 0):
            decision = None  # the ranks read different caches (another run wrote it meanwhile): measure
        where = "cache"
        if not trainer.model_accepts_loss_kwargs:  # the loss is a mean per micro-batch: regrouping changes it
            decision = AutotuneDecision(r.per_device, r.per_device, reason="the model takes no loss arguments")
            where = "skipped"
        elif decision is None:
            decision, where = measure(trainer, r), "measured"
            self.ctx.tokens.take()  # the probes' tokens are not the first step's
            if self.ctx.rank == 0:
                save(Path(r.cache), r.key, decision)
        self.mode, self.k = regroup(r.per_device, decision.micro)
        self.ctx.event("autotune", source=where, **decision.to_dict())


def install(regrouper: Regrouper) -> None:
    """Route Trainer.training_step through the regrouper (LlamaFactory's trainers inherit it)."""
    from transformers import Trainer

    original = getattr(Trainer, "_ft_original_training_step", Trainer.training_step)
    Trainer._ft_original_training_step = original

    def training_step(self: Any, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        return regrouper.step(self, model, inputs, num_items_in_batch, original)

    Trainer.training_step = training_step


def measure(trainer: Any, request: AutotuneRequest) -> AutotuneDecision:
    import torch

    started = time.monotonic()
    trainer.model.train()
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    done: dict[int, MicroProbe] = {}
    per, ga, card = request.per_device, request.grad_accum, request.gpu_bytes
    rows = len(trainer.train_dataset)  # packs under packing: the rows a micro-batch is made of
    while (micro := next_probe(done, per, ga, card, rows)) is not None:
        done[micro] = _agree(trainer, _probe(trainer, micro))
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
        torch.cuda.reset_peak_memory_stats()  # the steps report their own peak, not a probe's
    return decide(done, per, card, round(time.monotonic() - started, 2))


def _probe(trainer: Any, micro: int) -> MicroProbe:
    import torch

    model, cuda = trainer.model, torch.cuda.is_available()
    if len(trainer.train_dataset) < micro:
        return MicroProbe(micro)
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(micro)]))
    tokens = int(inputs["input_ids"].numel())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(PASSES + 1):
            if i == 1:
                _sync(cuda)
                t0 = time.monotonic()
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=tokens)
            loss.backward()
            del loss
        _sync(cuda)
        seconds = (time.monotonic() - t0) / PASSES / tokens
        peak = (torch.cuda.max_memory_allocated() if cuda else 0) + _optimizer_state_to_come(trainer)
        return MicroProbe(micro, seconds, peak)
    except torch.OutOfMemoryError:
        return MicroProbe(micro)
    finally:
        model.zero_grad(set_to_none=True)
        del inputs
        if cuda:
            torch.cuda.empty_cache()


def _optimizer_state_to_come(trainer: Any) -> int:
    """Adam keeps two fp32 moments per trainable parameter, allocated at the first optimizer step."""
    if trainer.optimizer is None or trainer.optimizer.state:
        return 0
    return sum(8 * p.numel() for p in trainer.model.parameters() if p.requires_grad)


def _agree(trainer: Any, probe: MicroProbe) -> MicroProbe:
    """Every rank takes the same decision: the slowest time, the highest peak, out of memory anywhere."""
    oom = float(probe.seconds_per_token is None)
    oom_any, seconds, peak = _max_over_ranks(trainer, [oom, probe.seconds_per_token or 0.0, float(probe.peak or 0)])
    return MicroProbe(probe.micro) if oom_any else MicroProbe(probe.micro, seconds, int(peak))


def _same_everywhere(trainer: Any, value: int) -> bool:
    high, minus_low = _max_over_ranks(trainer, [float(value), float(-value)])
    return high == -minus_low


def _max_over_ranks(trainer: Any, values: list[float]) -> list[float]:
    """Each value's maximum over the ranks (the values themselves in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=trainer.args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _zero(trainer: Any) -> Any:
    import torch

    return torch.zeros((), device=trainer.args.device)


def _pieces(trainer: Any, model: Any, pieces: list[Any], n: Any, original: Any) -> Any:
    """One training_step per piece; gradients are synchronised only with the last one."""
    total = None
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        with contextlib.nullcontext() if last else trainer.accelerator.no_sync(model):
            loss = original(trainer, model, piece, n)
        total = loss if total is None else total + loss
    return total


PAD = {"labels": -100}


def concat(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One batch from several, padded on the right to the longest (labels -100, masks closed).
    None unless all have the same keys, each a tensor of the same rank."""
    import torch
    import torch.nn.functional as F

    out: dict[str, Any] = {}
    if any(b.keys() != group[0].keys() for b in group):
        return None
    for key in group[0]:
        values = [b.get(key) for b in group]
        if not all(isinstance(v, torch.Tensor) and v.dim() == values[0].dim() and v.dim() >= 1 for v in values):
            return None
        if values[0].dim() == 4:  # a 4D attention mask (B, 1, L, L): padding attends to nothing
            length = max(v.shape[-1] for v in values)
            fill = False if values[0].dtype == torch.bool else torch.finfo(values[0].dtype).min
            values = [F.pad(v, (0, length - v.shape[-1], 0, length - v.shape[-2]), value=fill) for v in values]
        elif values[0].dim() == 2:
            length = max(v.shape[1] for v in values)
            values = [F.pad(v, (0, length - v.shape[1]), value=PAD.get(key, 0)) for v in values]
        if any(v.shape[1:] != values[0].shape[1:] for v in values):
            return None
        out[key] = torch.cat(values)
    return out


def split(inputs: dict[str, Any], k: int) -> list[dict[str, Any]]:
    import torch

    size = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    step = -(-size // k)
    return [
        {key: v[i : i + step] if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}
        for i in range(0, size, step)
    ]


def save(cache: Path, key: str, decision: AutotuneDecision) -> None:
    data = files.read_json(cache)
    data = data if isinstance(data, dict) else {}
    data[key] = decision.to_dict()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(cache, data)
    except OSError:
        pass  # a read-only cache only costs the probes next time
