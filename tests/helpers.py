"""Helpers for tests that run the real CLI, real torchrun and real LlamaFactory on CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
INVENTORIES = REPO / "tests" / "fixtures" / "inventories"
# config.json of the Llama-3.1-8B architecture: what preflight's memory estimates read.
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def offline_env(hf_home: Path) -> dict[str, str]:
    return {
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def write_config(demo_root: Path, tmp: Path, name: str = "run", **overrides: Any) -> Path:
    from ft_appliance.tools.demo import demo_config

    cfg = demo_config(demo_root)
    cfg["output_dir"] = str(tmp / "output" / name)
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ft_appliance", *args]


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_argv(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - closed with the process by the caller's wait
    return subprocess.Popen(
        cli_argv(*args), stdout=fh, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )


def state_dir(output_dir: Path) -> Path:
    return output_dir / ".ft"


def steps(output_dir: Path) -> list[dict[str, Any]]:
    from ft_appliance.state.files import read_jsonl

    return read_jsonl(state_dir(output_dir) / "steps.jsonl")


def last_step(output_dir: Path) -> int:
    s = steps(output_dir)
    return int(s[-1]["step"]) if s else 0


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def training_processes(output_dir: Path, attempt: int | None = None) -> list[psutil.Process]:
    from ft_appliance.tools.procs import training_processes as find

    return find(output_dir, attempt)


@contextlib.contextmanager
def killing_every_launch(output_dir: Path) -> Iterator[None]:
    """While inside: every training process of the run is SIGKILLed as soon as it appears, so each
    attempt dies before its first step."""
    done = threading.Event()

    def kill_loop() -> None:
        while not done.is_set():
            kill_training(output_dir)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_loop, daemon=True)
    killer.start()
    try:
        yield
    finally:
        done.set()
        killer.join()


def kill_training(output_dir: Path, sig: int = signal.SIGKILL) -> int:
    procs = training_processes(output_dir)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    return len(procs)


def status(output_dir: Path) -> dict[str, Any]:
    return json.loads((state_dir(output_dir) / "status.json").read_text())


def trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def read_adapter(output_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


SECRET = "hf_notasecretbutitmustnotleak"


class Hook:
    """A webhook receiver on loopback: answers `fail_first` requests with 503, then 200."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict] = []
        self.requests = 0
        self.fail_first = fail_first
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                if hook.requests <= hook.fail_first:
                    self.send_response(503)
                else:
                    hook.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token={SECRET}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # refused from now on, as a webhook that is down
