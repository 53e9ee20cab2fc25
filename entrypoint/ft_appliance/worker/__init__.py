"""What torchrun starts on every rank: LlamaFactory plus the appliance's callbacks."""
