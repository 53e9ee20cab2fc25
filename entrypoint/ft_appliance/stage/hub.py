"""Download a hub repo into the Hugging Face cache (HF_HOME on the volume) with huggingface_hub:
resumable (the client resumes partial files), retried with backoff on transient errors, its size
checked against free space first. HF_TOKEN comes from the environment (the env file in compose) and
huggingface_hub sends it; nothing here prints or writes it."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import EXIT_ENVIRONMENT, EXIT_INPUTS, PreflightError

ATTEMPTS = 5


@dataclass(frozen=True)
class Pulled:
    repo: str
    revision: str
    """The commit the files are of (the hub's sha)."""
    path: Path
    files: int
    bytes: int


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        code = exc.response.status_code if exc.response is not None else 0
        return code >= 500 or code == 429
    return _is_network(exc)


def _is_network(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def _retrying(backoff_s: float) -> Retrying:
    return Retrying(
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential(multiplier=backoff_s, max=30),
        retry=retry_if_exception(_transient),
        reraise=True,
    )


def one_line(exc: BaseException, repo: str, revision: str | None) -> PreflightError:
    """The hub's refusals as one line with the fix, and the exit code of their kind."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if isinstance(exc, GatedRepoError):
        why = "HF_TOKEN has no access to it" if token else "no HF_TOKEN is set"
        return PreflightError(
            f"{repo} is a gated repo and {why}: accept its terms on the hub with your account, then set "
            "HF_TOKEN in the environment or the env file (ft.env)", EXIT_INPUTS,
        )  # fmt: skip
    if isinstance(exc, RevisionNotFoundError):
        return PreflightError(f"{repo} has no revision {revision!r}: fix the revision, or leave it out", EXIT_INPUTS)
    if isinstance(exc, RepositoryNotFoundError):
        hint = " (or it is private and HF_TOKEN cannot see it)" if token else " (or it is private: set HF_TOKEN)"
        return PreflightError(f"{repo} is not a repo on the hub{hint}: check model_name_or_path", EXIT_INPUTS)
    if _is_network(exc):
        return PreflightError(
            f"cannot reach the hub to download {repo} ({type(exc).__name__}): check the network (HF_ENDPOINT, "
            "a proxy), or copy the model under /data/models and set model_name_or_path to it", EXIT_ENVIRONMENT,
        )  # fmt: skip
    return PreflightError(f"downloading {repo} failed: {type(exc).__name__}: {exc}", EXIT_ENVIRONMENT)


def repo_folder(repo: str, repo_type: str = "model") -> Path:
    """Where huggingface_hub keeps repo in the cache (models--org--name)."""
    return cache_dir() / f"{repo_type}s--{repo.replace('/', '--')}"


def downloaded_bytes(folder: Path) -> int:
    """Bytes in the repo's blobs, partial (.incomplete) files included."""
    blobs = folder / "blobs"
    return sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0


class ProgressLines:
    """Off a terminal (docker logs, a file) huggingface_hub's bars are turned off and this says how far
    the download got every `every_s` seconds instead; on a terminal the bars stay."""

    def __init__(self, folder: Path, total: int, say: Callable[[str], None], every_s: float | None = 15.0) -> None:
        self.folder, self.total, self.say, self.every_s = folder, total, say, every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ft-hub-progress", daemon=True)

    def __enter__(self) -> ProgressLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)

    def line(self) -> str:
        got = downloaded_bytes(self.folder)
        pct = 100.0 * got / self.total if self.total else 0.0
        return f"downloading {self.folder.name}: {got / 2**20:,.0f} of {self.total / 2**20:,.0f} MiB ({pct:.0f}%)"

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            self.say(self.line())


def _info(repo: str, revision: str | None, repo_type: str, backoff_s: float) -> Any:
    from huggingface_hub import HfApi

    api = HfApi()
    fetch = api.dataset_info if repo_type == "dataset" else api.model_info
    return _retrying(backoff_s)(fetch, repo, revision=revision, files_metadata=True)


def pull(
    repo: str, revision: str | None, say: Callable[[str], None], repo_type: str = "model", backoff_s: float = 2.0
) -> Pulled:
    """repo@revision into the cache, or one line (PreflightError) saying why not."""
    from huggingface_hub import snapshot_download

    try:
        info = _info(repo, revision, repo_type, backoff_s)
        size = sum(s.size or 0 for s in info.siblings or [])
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if free < size:
            raise PreflightError(
                f"{repo} needs {size / 2**30:.1f} GiB and {cache} has {free / 2**30:.1f} GiB free: free space on "
                "the volume, or point HF_HOME at a larger one", EXIT_ENVIRONMENT,
            )  # fmt: skip
        n = len(info.siblings or [])
        say(f"downloading {repo}@{info.sha[:12]} ({n} files, {size / 2**20:,.0f} MiB) into {cache}")
        # By the name asked for, not the sha: the client then records the ref (refs/main), which is
        # what the workers' offline lookups of model_name_or_path resolve.
        quiet = not sys.stderr.isatty()
        if quiet:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        every = 15.0 if quiet else None  # None: the bars say it
        with ProgressLines(repo_folder(repo, repo_type), size, say, every):
            path = _retrying(backoff_s)(snapshot_download, repo, revision=revision, repo_type=repo_type)
    except PreflightError:
        raise
    except Exception as exc:
        raise one_line(exc, repo, revision) from None
    return Pulled(repo, info.sha, Path(path), n, size)
