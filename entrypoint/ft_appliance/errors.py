"""Domain errors and the exit-code table (the one place exit codes are defined).

Each error carries one line for the user: what is wrong and how to fix it. The CLI prints that
line and exits with the class's code; a traceback therefore always means a bug in the appliance.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_PREFLIGHT = 4
EXIT_TRAINING = 5
EXIT_RETRIES = 6
EXIT_CRASH_LOOP = 7
EXIT_ENVIRONMENT = 8
EXIT_INPUTS = 9
EXIT_IN_USE = 10
EXIT_HANGUP = 128 + signal.SIGHUP  # 129: stopped because the terminal or session went away, resumable
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: same, from Ctrl-C
EXIT_STOPPED = 128 + signal.SIGTERM  # 143: stopped on request, resumable

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (or the run had already finished)",
    EXIT_OTHER: "other error",
    EXIT_USAGE: "usage error (unknown option, bad argument)",
    EXIT_CONFIG: "invalid config: missing file, bad YAML, unknown key, wrong type",
    EXIT_PREFLIGHT: "preflight failed: GPUs (count, precision, driver, memory) not as the config needs",
    EXIT_TRAINING: "training failed with an error that retrying cannot fix",
    EXIT_RETRIES: "training kept crashing; restarts used up",
    EXIT_CRASH_LOOP: "crash loop: restarts made no progress",
    EXIT_ENVIRONMENT: "environment: output volume not writable or full, /dev/shm too small, a package missing",
    EXIT_INPUTS: "inputs: model, tokenizer, template or dataset missing or unusable",
    EXIT_IN_USE: "the output_dir is in use by another live run (its supervisor or its training processes)",
    EXIT_HANGUP: "stopped by SIGHUP after saving a checkpoint; start again to resume",
    EXIT_INTERRUPTED: "stopped by SIGINT after saving a checkpoint; start again to resume",
    EXIT_STOPPED: "stopped by SIGTERM after saving a checkpoint; start again to resume",
}


class ApplianceError(Exception):
    """An error with a one-line explanation for the user and its own exit code."""

    exit_code = EXIT_OTHER

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ApplianceError):
    exit_code = EXIT_CONFIG


class PreflightError(ApplianceError):
    exit_code = EXIT_PREFLIGHT

    def __init__(self, message: str, exit_code: int = EXIT_PREFLIGHT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingFailed(ApplianceError):
    """Training failed in a way a retry cannot fix (bad data, OOM, a bug in the config)."""

    exit_code = EXIT_TRAINING


class RetriesExhausted(ApplianceError):
    exit_code = EXIT_RETRIES


class CrashLoop(ApplianceError):
    exit_code = EXIT_CRASH_LOOP


class VolumeFull(ApplianceError):
    """The output volume filled up; nothing was deleted, and the next start resumes."""

    exit_code = EXIT_ENVIRONMENT


class RunInUse(ApplianceError):
    """Another supervisor owns this output_dir, or training processes of an earlier one still live."""

    exit_code = EXIT_IN_USE


class StateError(ApplianceError):
    """A state file that `status`/`health` must read is malformed."""

    exit_code = EXIT_OTHER


class Stopped(ApplianceError):
    """The operator asked to stop; the run is resumable."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def exit_code_table() -> str:
    return "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())
