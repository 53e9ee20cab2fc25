"""Pure: the process-group timeout (LlamaFactory's `ddp_timeout`) for one attempt.

Every rank waits at a barrier while rank 0 (of the node, or of the job on a shared file system)
loads and tokenises the dataset. With a large dataset that wait outlasts the default timeout, and
the job dies in a barrier before its first step: the failure multi-node users hit most. So, until
this run's tokenised data is known to be in the cache (an attempt of the run reached a step with the
same data settings), an attempt's timeout is at least the startup limit. Once it is cached, later
attempts skip tokenisation and keep the configured timeout, so a collective that hangs is still
noticed early. The supervisor's own hang watchdog bounds every wait either way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# transformers' TrainingArguments.ddp_timeout default (seconds).
DEFAULT_DDP_TIMEOUT_S = 1800
# The arguments that decide what tokenisation produces (LlamaFactory's DataArguments and the
# tokenizer's source): a change to any of them means the cache is cold again.
DATA_KEYS = (
    "model_name_or_path", "tokenizer_name_or_path", "model_revision", "template", "dataset", "eval_dataset",
    "dataset_dir", "media_dir", "cutoff_len", "train_on_prompt", "mask_history", "streaming", "buffer_size",
    "mix_strategy", "interleave_probs", "max_samples", "val_size", "eval_num_beams", "packing", "neat_packing",
    "tool_format", "default_system", "enable_thinking", "tokenized_path", "stage", "seed", "overwrite_cache",
)  # fmt: skip


def data_key(args: Mapping[str, Any]) -> str:
    chosen = {k: args.get(k) for k in DATA_KEYS}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def attempt_timeout(args: Mapping[str, Any], data_cached: bool, startup_s: float) -> tuple[int, str | None]:
    """ddp_timeout for this attempt, and a note when it is raised above the configured one."""
    configured = int(args.get("ddp_timeout") or DEFAULT_DDP_TIMEOUT_S)
    if data_cached or configured >= startup_s:
        return configured, None
    raised = int(startup_s)
    return raised, (
        f"ddp_timeout {configured} s -> {raised} s (the startup limit) for this attempt: the dataset is not "
        f"tokenised and cached yet, and the other ranks wait at a barrier while it is; attempts after the "
        f"first step keep {configured} s"
    )
