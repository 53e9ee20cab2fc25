"""Which lines of the training processes reach the console; the attempt's log file gets all of them.

The appliance's own worker lines and LlamaFactory's, transformers' and DeepSpeed's warnings and
errors come through; INFO chatter (model configs, tokenizer dumps, per-step bars) and torchrun's
failure blocks (the supervisor says in one line how an attempt ended, with the log's path) do not.
A message every rank prints shows once. Pure.
"""

from __future__ import annotations

import re

WORKER_PREFIX = "[ft-appliance worker]"
RANK_PREFIX = re.compile(r"^\s*\[(?:default)?rank\d+\]:\s*")
# [WARNING|file.py:12] ... (transformers), [WARNING|2026-...] ... (LlamaFactory),
# [2026-... ] [WARNING] [file.py:...] (DeepSpeed)
LEVELLED = re.compile(r"^\[(?:WARNING|ERROR|CRITICAL)\||^\[[\d\- :,.]+\] \[(?:WARNING|ERROR|CRITICAL)\]")
STAMPS = re.compile(r"\d{4}-\d\d-\d\d[ T][\d:,.]+|\b\d{2}:\d{2}:\d{2}[\d,.]*")


def shown(line: str) -> bool:
    text = RANK_PREFIX.sub("", line)
    return text.startswith(WORKER_PREFIX) or bool(LEVELLED.match(text))


def message_key(line: str) -> str:
    """The line without its rank prefix and time stamps: what makes two ranks' copies one message."""
    return STAMPS.sub("", RANK_PREFIX.sub("", line)).strip()
