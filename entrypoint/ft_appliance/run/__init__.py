"""Own and supervise a run: torchrun command, process tree, attempts, watchdog, status, retries."""
