"""ft-appliance: LlamaFactory fine-tuning under torchrun with preflight and crash-resume."""

__version__ = "0.1.0"
