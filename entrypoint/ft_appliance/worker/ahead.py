"""What a spare does before its go, beyond importing the stack: the work the attempt it becomes would
otherwise do first, that depends on no run argument but whether the run uses DeepSpeed.

- deepspeed, for a DeepSpeed run (the Trainer's setup imports it; worker/deepspeed_import.py).
- transformers' auto-model mappings: LlamaFactory's load_model tests the config's type against three
  of them (image-text, seq2seq, text-to-waveform), and a mapping's first keys() resolves every config
  class it lists: 0.6 s on the CI machine, once per process.
"""

from __future__ import annotations


def prepare(deepspeed: bool) -> None:
    from transformers import AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform

    for auto in (AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform):
        auto._model_mapping.keys()
    if deepspeed:
        import deepspeed as _  # noqa: F401
