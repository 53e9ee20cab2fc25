"""On a machine with NVIDIA GPUs only (skipped elsewhere): the real NVML path and a short bf16 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_appliance.preflight.gpus import read_nvml

from tests.helpers import run_cli, trainer_state

INV = read_nvml()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(INV.count == 0, reason=f"no GPU: {INV.error}")]


def test_nvml_inventory_is_complete() -> None:
    g = INV.gpus[0]
    assert g.name and g.memory_total_mib > 1000 and g.compute_capability >= (3, 0)
    assert INV.driver_version and INV.driver_cuda and INV.torch_cuda


def test_check_and_short_bf16_lora_run_on_every_gpu(tmp_path: Path) -> None:
    from ft_appliance.tools.demo import build_demo

    cfg = build_demo(tmp_path / "data", max_steps=20, save_steps=10)
    res = run_cli("check", str(cfg), "--json", timeout=300)
    report = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout
    assert report["nproc"] == INV.count
    if min(g.compute_capability for g in INV.gpus) >= (8, 0):
        assert report["updates"]["bf16"] is True  # precision chosen by policy; the profile adds its keys
    res = run_cli("train", str(cfg), "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "data" / "output" / "demo-lora"
    assert trainer_state(out)["global_step"] == 20
    result = json.loads(res.stdout)
    assert result["progress"]["tokens"] > 0 and result["progress"]["loss"] < result["progress"]["first_loss"]


def test_sigterm_on_gpu_saves_exits_and_frees_the_gpu(tmp_path: Path) -> None:
    import signal
    import subprocess

    from ft_appliance.tools.demo import build_demo

    from tests.helpers import last_step, start_cli, wait_for

    cfg = build_demo(tmp_path / "data", max_steps=400, save_steps=200)
    out = tmp_path / "data" / "output" / "demo-lora"
    sup = start_cli("train", str(cfg), log=tmp_path / "log")
    wait_for(lambda: last_step(out) >= 20, 300, what="step 20")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(120) == 143, (tmp_path / "log").read_text()[-3000:]
    s = json.loads((out / ".ft" / "stopped.json").read_text())["step"]
    assert (out / f"checkpoint-{s}" / ".ft-complete.json").exists()
    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    assert apps == "", f"GPU memory still held by: {apps}"
    res = run_cli("train", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert trainer_state(out)["global_step"] == 400
    assert "restarts 1; steps lost 0" in res.stdout


@pytest.mark.parametrize("name", ["varlen", "cudnn", "flex"])
def test_blockdiag_kernels_match_the_reference_forward_and_backward(name: str) -> None:
    """torch's FlashAttention-2 varlen kernel and FlexAttention's block-sparse one, as the appliance
    calls them, against SDPA with a dense mask (every real token; a row's trailing pads differ)."""
    import torch
    from ft_appliance.worker import attention

    available, build = attention.KERNELS[name]
    if not available():
        pytest.skip(f"torch {torch.__version__} has no {name} kernel here")
    kernel = build()
    attention.register((kernel,))
    torch.manual_seed(0)
    # Llama-3.1-8B heads (32 query, 8 key/value, dim 128); two rows packed with 3 and 2 examples + padding
    position_ids = torch.tensor(
        [list(range(300)) + list(range(500)) + list(range(224)), list(range(700)) + list(range(320)) + [0] * 4],
        device="cuda",
    )
    real = torch.ones_like(position_ids, dtype=torch.bool)
    real[1, -3:] = False  # the pads after the first (which opens the padding piece)
    rows, length = position_ids.shape
    # as transformers hands them over: (B, H, L, D) views of the projections' (B, L, H, D) outputs
    q, k, v = (
        torch.randn(rows, length, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        for heads in (32, 8, 8)
    )
    module = torch.nn.Module()
    out, _ = attention.blockdiag_attention_forward(module, q, k, v, None, scaling=128**-0.5, position_ids=position_ids)
    assert attention._state.proven and attention._state.kernels == (kernel,)  # no fallback took over
    grad = torch.randn_like(out).masked_fill(~real[..., None, None], 0)
    (out * grad).sum().backward()

    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention.reference_kernel(*ref_in, attention.example_ids(position_ids), 128**-0.5).transpose(1, 2)
    (ref * grad.float()).sum().backward()
    torch.testing.assert_close(out.float()[real], ref[real], atol=2e-2, rtol=2e-2)
    for t, r in zip((q, k, v), ref_in, strict=True):
        got, want = t.grad.float().transpose(1, 2)[real], r.grad.transpose(1, 2)[real]
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["varlen", "cudnn"])
def test_with_the_pieces_from_the_host_a_forward_and_backward_never_wait(name: str) -> None:
    """The data loader's copy brings the pieces along (attention.install_host_layouts): the layers'
    attention then runs without one device synchronisation, and gives what the GPU's pieces give."""
    import torch
    from accelerate import data_loader
    from ft_appliance.worker import attention

    available, build = attention.KERNELS[name]
    if not available():
        pytest.skip(f"torch {torch.__version__} has no {name} kernel here")
    attention.register((build(),))
    assert attention.install_host_layouts()
    position_ids = torch.tensor([list(range(300)) + list(range(500)) + list(range(224)), list(range(1024))])
    moved = data_loader.send_to_device({"position_ids": position_ids.pin_memory()}, "cuda", non_blocking=True)
    q, k, v = (
        torch.randn(2, 1024, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        for heads in (32, 8, 8)
    )
    module = torch.nn.Module()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = attention.blockdiag_attention_forward(
            module, q, k, v, None, scaling=128**-0.5, position_ids=moved["position_ids"]
        )
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert attention._state.proven and attention._state.layout[1] == 1024
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    on_gpu = moved["position_ids"].clone()  # another tensor: its pieces are worked out on the GPU
    again, _ = attention.blockdiag_attention_forward(module, q, k, v, None, scaling=128**-0.5, position_ids=on_gpu)
    again.float().square().sum().backward()
    torch.testing.assert_close(out, again, atol=0, rtol=0)  # the same pieces and bound: the same kernel call
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):  # atomics: summation order varies
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_liger_fused_loss_backward_without_its_sync_gives_the_same_gradients() -> None:
    import torch

    liger = pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy")
    from ft_appliance.worker.liger import drop_loss_backward_sync

    torch.manual_seed(0)
    x0 = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32000, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    target = torch.randint(0, 32000, (2048,), device="cuda")
    target[:100] = -100

    def grads(scale: float) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        loss = liger.LigerFusedLinearCrossEntropyFunction.apply(x, weight, target)[0]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if patched else "default")
        try:
            (loss * scale).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return x.grad

    original = liger.fused_linear_cross_entropy_backward
    patched = False
    try:
        before = [grads(s) for s in (1.0, 0.25)]
        assert drop_loss_backward_sync()
        patched = True
        after = [grads(s) for s in (1.0, 0.25)]  # a synchronisation in backward would raise here
    finally:
        liger.fused_linear_cross_entropy_backward = original
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(before[0], before[1])


def test_a_crashed_rank_restarts_on_spare_workers_that_held_no_gpu_memory(tmp_path: Path) -> None:
    import signal
    import subprocess

    from ft_appliance.tools.demo import build_demo
    from ft_appliance.tools.procs import kill_run, spare_processes, worker_ranks

    from tests.helpers import start_cli, steps, wait_for

    # Long enough that the spare has imported the stack (about 20 s) well before the end.
    cfg = build_demo(tmp_path / "data", max_steps=20000, save_steps=20)
    out = tmp_path / "data" / "output" / "demo-lora"
    sup = start_cli("train", str(cfg), "--backoff", "0", log=tmp_path / "log")
    try:
        spare = out / ".ft" / "spares" / "1"
        wait_for(lambda: len(list(spare.glob("ready-rank*"))) == INV.count, 300, what="spare workers imported")
        spare_pids = {p.pid for p in spare_processes(out)}
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split()
        assert spare_pids and not spare_pids & {int(a) for a in apps}, (spare_pids, apps)
        worker_ranks(out, 1)[0].send_signal(signal.SIGKILL)
        wait_for(lambda: any(r["attempt"] == 2 for r in steps(out)), 300, what="a step of attempt 2")
        assert json.loads((out / ".ft" / "attempts" / "2" / "launch.json").read_text())["spare"]
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(120) == 143, (tmp_path / "log").read_text()[-3000:]
    finally:
        if sup.poll() is None:
            kill_run(sup, out)


def test_demo_trains_on_every_visible_gpu(tmp_path: Path) -> None:
    """`ft-appliance demo` on a GPU host: one process per visible GPU, bf16 where the card has it."""
    res = run_cli("demo", str(tmp_path / "demo"), "--max-steps", "10", "--save-steps", "5", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "finished: 10/10 steps" in res.stdout
    out = tmp_path / "demo" / "output" / "demo-lora"
    launch = json.loads((out / ".ft" / "attempts" / "1" / "launch.json").read_text())
    if INV.count > 1:
        assert launch["argv"][launch["argv"].index("--nproc-per-node") + 1] == str(INV.count)
    else:  # one GPU needs no process group: the worker runs without torchrun
        assert "torch.distributed.run" not in launch["argv"]
    if min(g.compute_capability for g in INV.gpus) >= (8, 0):
        assert "precision: bf16" in res.stdout


def test_triton_cache_key_is_worked_out_in_the_background() -> None:
    """worker/ahead.py: the key Triton hashes at its first kernel launch is ready after the thread."""
    from ft_appliance.worker import ahead
    from triton.runtime.cache import triton_key

    triton_key.cache_clear()
    ahead.warm_in_background().join(120)
    assert triton_key.cache_info().currsize == 1
    assert ahead.warm_triton()  # from the cache now
    assert triton_key.cache_info().hits >= 1


CONTEXT_AHEAD = """
import ctypes
from ft_appliance.worker import ahead
assert ahead.open_cuda_context(0)
cuda = ctypes.CDLL("libcuda.so.1")
dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
cuda.cuDeviceGet(ctypes.byref(dev), 0)
cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
import torch
x = torch.ones(4, device="cuda") * 2
current, primary = ctypes.c_void_p(), ctypes.c_void_p()
cuda.cuCtxGetCurrent(ctypes.byref(current))
cuda.cuDevicePrimaryCtxRetain(ctypes.byref(primary), dev)
print(active.value, current.value == primary.value, x.sum().item())
"""


def test_the_context_made_ahead_is_the_one_torch_uses() -> None:
    """worker/ahead.open_cuda_context: the primary context is active before torch's first call, and torch
    computes in it rather than in a second one."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", CONTEXT_AHEAD], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-3:] == ["1", "True", "8.0"], res.stdout
