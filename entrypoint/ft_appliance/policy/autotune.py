"""Batch autotune, the pure part: which micro-batch to time next, which one wins, and the cache key.

The workers time the candidates at train begin, on the loaded model (worker/autotune.py), so a first
start pays a few forward and backward passes instead of whole extra launches. A candidate other than
the config's is trained by merging (or splitting) the config's micro-batches, which keeps the data
order and the effective batch. A larger micro-batch is kept only when it is at least MIN_GAIN faster
per token: on an H200 the seed's 8 x 1 bought 1% for 34 GiB more memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..state.records import AutotuneDecision, MicroProbe

TARGET = 0.8
"""Share of the card's memory a chosen micro-batch may peak at."""
MIN_GAIN = 0.02
# What the memory and speed of a step depend on; the cache key is built from these and the card.
KEY_ARGS = (
    "model_name_or_path",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cutoff_len",
    "finetuning_type",
    "lora_rank",
    "lora_target",
    "quantization_bit",
    "packing",
    "neat_packing",
    "enable_liger_kernel",
    "disable_gradient_checkpointing",
    "deepspeed",
    "bf16",
    "fp16",
    "flash_attn",
)


def sizes(per: int, ga: int, rows: int | None = None) -> list[int]:
    """Micro-batches the workers can train with, ascending: a divisor of the config's (split), or
    the config's times a divisor of the accumulation (merged), no larger than the dataset's rows."""
    smaller = [m for m in range(1, per) if per % m == 0]
    merged = [per * k for k in range(1, ga + 1) if ga % k == 0]
    return smaller + [m for m in merged if m == per or rows is None or m <= rows]


def fits(probe: MicroProbe, gpu_bytes: int, target: float = TARGET) -> bool:
    return probe.seconds_per_token is not None and probe.peak is not None and probe.peak <= target * gpu_bytes


def next_probe(
    done: Mapping[int, MicroProbe], per: int, ga: int, gpu_bytes: int, rows: int | None = None
) -> int | None:
    """The next size to time, or None when the decision is made. The config's first; down while it
    does not fit; up while each larger size fits and gains at least MIN_GAIN on the best so far.
    Nothing when the dataset has fewer rows than one micro-batch (no batch to time)."""
    if rows is not None and rows < per:
        return None
    if per not in done:
        return per
    all_sizes = sizes(per, ga, rows)
    if not fits(done[per], gpu_bytes):
        lower = [m for m in all_sizes if m < per]
        if any(fits(done[m], gpu_bytes) for m in lower if m in done):
            return None
        untried = [m for m in lower if m not in done]
        return max(untried) if untried else None
    tried = sorted(m for m in done if m >= per)
    if len(tried) > 1 and _winner(done, tried[:-1], gpu_bytes) == _winner(done, tried, gpu_bytes):
        return None  # the last size did not fit or did not pay: larger ones are not tried
    larger = [m for m in all_sizes if m > max(tried)]
    return larger[0] if larger else None


def _winner(done: Mapping[int, MicroProbe], ascending: list[int], gpu_bytes: int) -> int:
    best = ascending[0]
    for m in ascending[1:]:
        probe, base = done[m], done[best]
        if fits(probe, gpu_bytes) and base.seconds_per_token / probe.seconds_per_token >= 1 + MIN_GAIN:  # type: ignore[operator]
            best = m
    return best


def decide(done: Mapping[int, MicroProbe], per: int, gpu_bytes: int, seconds: float) -> AutotuneDecision:
    """The size to train with and why. Nothing fits: the config's, and the run meets its own fate."""
    probes = [done[m] for m in sorted(done)]
    fitting = [m for m in sorted(done) if fits(done[m], gpu_bytes)]
    if not done:
        return AutotuneDecision(per, per, [], f"{per} kept: the dataset has fewer rows than one micro-batch", seconds)
    if not fitting:
        reason = f"no micro-batch fit within {TARGET:.0%} of GPU memory; the config's {per} kept"
        return AutotuneDecision(per, per, probes, reason, seconds)
    base = per if per in fitting else max(m for m in fitting if m < per)
    micro = _winner(done, [m for m in fitting if m >= base], gpu_bytes)
    return AutotuneDecision(micro, per, probes, _reason(done, per, base, micro, gpu_bytes), seconds)


def _reason(done: Mapping[int, MicroProbe], per: int, base: int, micro: int, gpu_bytes: int) -> str:
    if base != per:
        return f"the config's {per} does not fit within {TARGET:.0%} of GPU memory; {base} does"
    if micro != per:
        gain = done[per].seconds_per_token / done[micro].seconds_per_token - 1  # type: ignore[operator]
        return f"{micro} is {gain:.1%} faster per token than {per} (at least {MIN_GAIN:.0%} needed)"
    larger = [m for m in sorted(done) if m > per]
    if not larger:
        return f"{per} kept: no larger size to try" if per == max(done) else f"{per} kept"
    m = larger[0]
    if not fits(done[m], gpu_bytes):
        return f"{per} kept: {m} does not fit within {TARGET:.0%} of GPU memory"
    gain = done[per].seconds_per_token / done[m].seconds_per_token - 1  # type: ignore[operator]
    return f"{per} kept: {m} is {gain:+.1%} per token, under the {MIN_GAIN:.0%} that would pay for its memory"


def cached(data: Any, key: str, per: int, ga: int) -> AutotuneDecision | None:
    """A decision from the cache file's contents, if it still applies to this config's batch."""
    entry = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        return None
    try:
        decision = AutotuneDecision.from_dict(entry)
    except ValueError:
        return None
    return decision if decision.per_device == per and decision.micro in sizes(per, ga) else None


def cache_key(args: Mapping[str, Any], gpu_name: str, world: int, tweaks: tuple[str, ...] = ()) -> str:
    parts: dict[str, Any] = {k: args.get(k) for k in KEY_ARGS}
    parts["tweaks"] = sorted(tweaks)  # the profile's changes to the model (float8 base) change the timings
    parts["gpu"] = gpu_name
    parts["world"] = world
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def regroup(per: int, micro: int) -> tuple[str, int]:
    """How the workers get `micro` from the config's micro-batches: ("merge", k) joins k of them,
    ("split", k) cuts each into k, ("keep", 1) leaves them."""
    if micro == per:
        return "keep", 1
    return ("merge", micro // per) if micro > per else ("split", per // micro)


def describe(decision: AutotuneDecision, source: str) -> str:
    """The console's line for the workers' `autotune` event."""
    how = {"merge": "{k} of the config's joined", "split": "the config's cut in {k}"}
    mode, k = regroup(decision.per_device, decision.micro)
    shape = f" ({how[mode].format(k=k)})" if mode in how else ""
    timed = "; ".join(f"{p.micro}: {_timing(p)}" for p in decision.probes)
    cost = f"measured in {decision.seconds:.1f} s" if source == "measured" else f"from the {source}"
    line = f"autotune ({cost}): micro-batch {decision.micro}{shape}: {decision.reason}"
    return line + (f" [{timed}]" if timed else "")


def _timing(p: MicroProbe) -> str:
    if p.seconds_per_token is None:
        return "out of memory"
    return f"{p.seconds_per_token * 1e6:.2f} us/token, {(p.peak or 0) / 2**30:.1f} GiB"
