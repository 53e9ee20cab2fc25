"""GPU benchmark: the seed configuration (Llama-3.1-8B architecture, random weights, LoRA r8 on all
linear layers, bf16, per_device 4 x grad_accum 2, cutoff 2048) under plain LlamaFactory and under the
appliance, on one GPU machine without network.

    python benchmarks/bench.py --workdir /tmp/bench --steps 30 [CASE ...]

Builds the model, a local tokenizer with the llama3 special tokens and a synthetic dataset of
200-1500-token examples, then runs each case and prints one table row per case: real (non-padding)
tokens/s per GPU, s/step, peak reserved memory, MFU (4N), launch to first step, checkpoint save.
Results also go to $OUT/bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from ft_appliance.tools.demo import build_tokenizer
from ft_appliance.tools.procs import for_each_alive, spare_processes, training_processes

N_PARAMS = 7.505e9  # the convention for MFU (4N): frozen base, no weight gradients
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

# Full fine-tuning's model: the Llama architecture at Qwen2.5-1.5B's sizes (1.8B with an untied head),
# trained in fp32 master weights: 21 GB of checkpoint with its AdamW state.
LLAMA_1B5 = dict(
    LLAMA_8B,
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
)
MODELS = {"llama-8b-random": LLAMA_8B, "llama-1.5b-random": LLAMA_1B5}
# A save every 50 steps: a background write (about 21 GB) must end before the next save begins.
FULL = {"model": "llama-1.5b-random", "finetuning_type": "full", "lora_rank": None, "lora_target": None,
        "save_steps": 50, "save_total_limit": 1, "gradient_accumulation_steps": 1, "learning_rate": 1.0e-5}  # fmt: skip
DS_Z2 = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "ds_z2_config.json")

# Each case: (runner, overrides, appliance flags). "lf-cli" runs llamafactory-cli itself.
CASES: dict[str, tuple[str, dict, list[str]]] = {
    "lf-cli": ("lf", {}, []),
    "defaults": ("ft", {}, ["--no-profile"]),
    "liger": ("ft", {"enable_liger_kernel": True}, ["--no-profile"]),
    "liger+packing": ("ft", {"enable_liger_kernel": True, "packing": True}, ["--no-profile"]),
    "liger+neat": ("ft", {"enable_liger_kernel": True, "packing": True, "neat_packing": True}, ["--no-profile"]),
    "liger+packing+nogc": (
        "ft",
        {"enable_liger_kernel": True, "packing": True, "disable_gradient_checkpointing": True},
        ["--no-profile"],
    ),
    "liger+neat+nogc": (
        "ft",
        {"enable_liger_kernel": True, "packing": True, "neat_packing": True, "disable_gradient_checkpointing": True},
        ["--no-profile"],
    ),
    "profile": ("ft", {}, []),
    "profile-nospare": ("ft", {}, ["--no-spare"]),  # a restart without the warm spare's imports
    "profile-noautotune": ("ft", {}, ["--no-autotune"]),
    "profile-nofused": ("ft", {}, []),  # the profile with LoRA layers one by one (CASE_ENV)
    "profile-flex": ("ft", {}, []),  # the profile with FlexAttention for neat packing (CASE_ENV)
    "profile-cudnn": ("ft", {}, []),  # the profile with cuDNN's fused attention for neat packing (CASE_ENV)
    "profile-basefirst": ("ft", {}, []),  # the profile with each LoRA sum started by the base GEMM (CASE_ENV)
    "profile-hostpieces": ("ft", {}, []),  # the profile with varlen's pieces from the host (CASE_ENV)
    "profile-cudaahead": ("ft", {}, []),  # the profile with the CUDA context made during the imports (CASE_ENV)
    # The FP8 profile: the frozen base's matmuls in float8 (worker/fp8.py), the rest as the profile.
    "fp8": ("ft", {}, ["--fp8-base"]),
    # QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (the GPU image carries it), the profile on.
    "qlora": ("ft", {"quantization_bit": 4, "quantization_method": "bnb", "double_quantization": True}, []),
    # Full fine-tuning of the 1.8B model: checkpoints written in the background (the default), in the
    # step, and by DeepSpeed ZeRO-2 (its own checkpoint engine; the relaunch case for --kill-at).
    "full": ("ft", FULL, []),
    "full-sync": ("ft", FULL, ["--sync-saves"]),
    "full-ds": ("ft", {**FULL, "deepspeed": DS_Z2}, []),
}


# Environment for a case's workers: FT_SKIP_TWEAKS leaves one of the profile's worker tweaks out.
CASE_ENV = {
    "profile-nofused": {"FT_SKIP_TWEAKS": "lora-fused-projections"},
    "profile-flex": {"FT_ATTENTION_KERNELS": "flex"},
    "profile-cudnn": {"FT_ATTENTION_KERNELS": "cudnn,varlen"},
    "profile-basefirst": {"FT_LORA_SUM_ORDER": "base-first"},
    "profile-hostpieces": {"FT_HOST_PIECES": "1"},
    "profile-cudaahead": {"FT_CUDA_AHEAD": "1"},
}


def _build_model(model_dir: Path, sizes: dict, texts: list[str], tiny: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").exists():
        return
    if tiny:  # CPU variant: the demo's tiny Llama (hidden 64, 2 layers) under the same name
        from ft_appliance.tools.demo import build_model

        build_model(model_dir, vocab_size=len(build_tokenizer(texts, model_dir)))
        return
    t0 = time.time()
    build_tokenizer(texts, model_dir, vocab_size=8000)
    config = LlamaConfig(**sizes, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    print(f"{model_dir.name}: model and tokenizer built in {time.time() - t0:.0f} s", flush=True)


def build(
    work: Path, n_examples: int = 3000, tiny: bool = False, models: tuple[str, ...] = ("llama-8b-random",)
) -> None:
    rng = random.Random(0)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))) for _ in range(5000)]
    # The tokenizers' texts are drawn first whichever models this call builds: the dataset draws from
    # the same generator next, and stays the one of earlier calls.
    texts = [" ".join(rng.choices(words, k=200)) for _ in range(500 if tiny else 2000)]
    for name in models:
        _build_model(work / "models" / name, MODELS[name], texts, tiny)
    model_dir = work / "models" / models[0]
    data = work / "datasets"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "synthetic.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        examples = []
        for _ in range(n_examples):
            target = rng.randint(20, 150) if tiny else rng.randint(200, 1500)
            n_words = int(target / 1.6)
            prompt = " ".join(rng.choices(words, k=n_words // 3))
            answer = " ".join(rng.choices(words, k=n_words - n_words // 3))
            examples.append({"instruction": prompt, "input": "", "output": answer})
        lens = [len(tok(e["instruction"] + " " + e["output"])["input_ids"]) for e in examples[:200]]
        (data / "synthetic.json").write_text(json.dumps(examples))
        (data / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "synthetic.json"}}))
        print(
            f"dataset: {n_examples} examples, tokens per example {min(lens)}-{max(lens)} "
            f"(mean {sum(lens) / len(lens):.0f})",
            flush=True,
        )


def seed_config(work: Path, name: str, steps: int, overrides: dict) -> Path:
    overrides = dict(overrides)
    model = overrides.pop("model", "llama-8b-random")
    cfg = {
        "model_name_or_path": str(work / "models" / model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": "synthetic",
        "dataset_dir": str(work / "datasets"),
        "template": "llama3",
        "cutoff_len": 2048,
        "overwrite_cache": False,
        "preprocessing_num_workers": 16,
        "dataloader_num_workers": 4,
        "output_dir": str(work / "output" / name),
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 10,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "bf16": True,
        "max_steps": steps,
        "report_to": "none",
        "seed": 42,
    }
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def bake_schema(directory: Path) -> None:
    """LlamaFactory's argument schema, baked as the image's build does (Dockerfile, FT_BAKED_CACHE): a
    new volume's first check reads it instead of importing LlamaFactory's arguments. `--cold` empties
    the volume's caches, not this one, which is part of the image."""
    from ft_appliance.preflight.gate import bake

    bake(directory)
    os.environ["FT_BAKED_CACHE"] = str(directory)  # inherited by the CLI


def compile_bytecode(prefix: Path) -> float:
    """Bytecode for every package on sys.path, kept under prefix, as the image build has it.

    pip compiles bytecode when the image is built; a machine whose Python environment has none and
    writes none (read-only site-packages, PYTHONDONTWRITEBYTECODE) compiles torch, sympy and the rest
    from source at every start: 8 of 13 import seconds in a profile of one launch. The prefix leaves the
    machine's own installation untouched. Also used by gpu_smoke.sh before the GPU tests. Returns the
    seconds spent (next to nothing once done).
    """
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)  # inherited by compileall, the CLI, torchrun, workers
    # The standard library too: with a prefix set, Python looks for every module's bytecode there only.
    dirs = sorted({p for p in sys.path if p and Path(p).is_dir()})
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # the standard library's test data warns about its own odd syntax
        check=False,  # a few upstream files (templates, Python 2 leftovers) do not compile; nothing imports them
    )
    return time.time() - started


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_case(
    work: Path,
    name: str,
    steps: int,
    kill_at: int | None = None,
    extra: dict | None = None,
    mfu: bool = True,
    cold: bool = False,
    trace: bool = False,
) -> dict:
    runner, overrides, flags = CASES[name]
    cfg = seed_config(work, name, steps, {**overrides, **(extra or {})})
    out = work / "output" / name
    shutil.rmtree(out, ignore_errors=True)  # every case trains from scratch
    log = work / f"{name}.log"
    env = {**os.environ, **CASE_ENV.get(name, {})}
    if cold:  # a first start on a new volume: no compiled kernels, no autotune decision
        fresh = work / "cold" / f"{name}-{time.time_ns()}"
        env |= {"TRITON_CACHE_DIR": str(fresh / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(fresh / "inductor")}
        env["FT_CACHE_DIR"] = str(fresh / "ft")
    if trace:  # worker/counting.StepTrace: steps 9 and 10, rank 0
        shutil.rmtree(work / "trace" / name, ignore_errors=True)
        env["FT_TRACE_STEPS"] = f"{work / 'trace' / name}:8:2"
    if runner == "lf":
        argv = [sys.executable, "-c", "from llamafactory.cli import main; main()", "train", str(cfg)]
    else:
        argv = [sys.executable, "-m", "ft_appliance", "train", str(cfg), "--backoff", "0", *flags]
    t0 = time.time()
    extra_result: dict = {}
    arrivals: dict[int, float] = {}  # LlamaFactory's trainer_log.jsonl line count -> when it was reached
    lf_log_path = out / "trainer_log.jsonl"
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        killed = None
        while proc.poll() is None:
            # Both runners write LlamaFactory's log once per step (logging_steps 1): timing its lines
            # measures plain LlamaFactory and the appliance the same way.
            try:
                n = lf_log_path.read_text().count("\n")
            except OSError:
                n = 0
            if n and n not in arrivals:
                arrivals[n] = time.time()
            if kill_at is not None and killed is None:
                s = read_jsonl(out / ".ft" / "steps.jsonl")
                if s and s[-1]["step"] >= kill_at:
                    if shutil.which("nvidia-smi"):  # the spare's waiting workers must hold no GPU memory
                        apps = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
                        gpu_apps = subprocess.run(apps, capture_output=True, text=True).stdout.strip().splitlines()
                        spares = [p.pid for p in spare_processes(out)]
                        extra_result = {"gpu_apps_before_kill": gpu_apps, "spare_pids": spares}
                    for_each_alive(training_processes(out, s[-1]["attempt"]), psutil.Process.kill)
                    killed = time.time()
            time.sleep(0.01)
        rc = proc.wait()
    wall = time.time() - t0
    result = {"case": name, "rc": rc, "wall_s": round(wall, 1), "overrides": overrides, "flags": flags}
    result.update(extra_result)
    marks = sorted(arrivals)
    gaps = [
        arrivals[b] - arrivals[a]
        for a, b in zip(marks, marks[1:], strict=False)
        if b == a + 1 and a >= 5 and a % 10 != 0
    ]
    if kill_at is None and gaps:
        result["s_per_step_lf_log"] = round(sum(gaps) / len(gaps), 3)
    lf_log = read_jsonl(lf_log_path)
    if lf_log:  # the first steps' loss, to compare the profile's with the defaults'
        result["first_losses"] = [round(r["loss"], 4) for r in lf_log[:5] if "loss" in r]
        result["losses"] = [round(r["loss"], 5) for r in lf_log if "loss" in r]  # the whole curve
    steps_rec = read_jsonl(out / ".ft" / "steps.jsonl")
    if steps_rec:
        last_attempt = steps_rec[-1]["attempt"]
        mine = [r for r in steps_rec if r["attempt"] == last_attempt and not r.get("first")]
        # An Event's own numbers ride in its `data` (state/records.py): read them beside its fields.
        events = [{**e.get("data", {}), **e} for e in read_jsonl(out / ".ft" / "events.jsonl")]
        saved = {e["step"] for e in events if e.get("event") == "save"} or set(range(10, steps + 1, 10))
        traced = {9, 10} if trace else set()  # the profiler slows the steps it records
        steady = [r for r in mine if r["step"] > 5 and r["step"] - 1 not in saved and r["step"] not in traced]
        sec = sum(r["seconds"] for r in steady)
        tok = sum(r["tokens"] for r in steady)
        result.update(
            s_per_step=round(sec / len(steady), 3),
            real_tok_s=round(tok / sec),
            tokens_per_step=round(tok / len(steady)),
            peak_reserved_gib=round(max(r.get("mem_reserved") or 0 for r in steps_rec) / 2**30, 1),
        )
        if mfu:  # the 8B model on an H100 only: the tiny CPU model has neither N_PARAMS nor PEAK_FLOPS
            result["mfu_4n"] = round(result["real_tok_s"] * 4 * N_PARAMS / PEAK_FLOPS * 100, 1)
        first = steps_rec[0]
        result["launch_to_first_step_s"] = round(first["time"] - t0 - first["seconds"], 1)  # the step begins
        result["launch_to_first_step_done_s"] = round(first["time"] - t0, 1)
        result["first_step_s"] = first["seconds"]
        result["startup"] = startup_breakdown(events, steps_rec, attempt=1, cli_start=t0)
        tuned = [e for e in events if e.get("event") == "autotune"]
        if tuned:  # the workers' decision, each size's timing and peak, and what the probes cost
            result["autotune"] = {k: tuned[0].get(k) for k in ("source", "micro", "reason", "seconds", "probes")}
        saves = [e for e in events if e.get("event") == "save"]
        if saves:
            result["saves"] = [{k: e.get(k) for k in ("step", "stalled", "seconds")} for e in saves]
            result["save_s"] = max(e["seconds"] for e in saves)  # step end -> marker
            result["save_stall_s"] = max(e.get("stalled", e["seconds"]) for e in saves)  # step end -> training again
            result["after_save_step_s"] = _after_save(mine, saved, result["s_per_step"])
        split = work / "trace" / name / "breakdown.json"
        if trace and split.exists():
            result["breakdown"] = json.loads(split.read_text())
        if killed is not None:
            resumed = [r for r in steps_rec if r["attempt"] > 1]
            if resumed:
                result["crash_to_first_resumed_step_s"] = round(resumed[0]["time"] - killed, 1)
                result["resumed_at_step"] = resumed[0]["step"]
                result["resume_startup"] = startup_breakdown(events, steps_rec, attempt=resumed[0]["attempt"])
    print(json.dumps(result), flush=True)
    return result


def _after_save(steps_rec: list[dict], saved: set[int], steady: float) -> float | None:
    """The mean time of a step that follows a save, beyond a steady step: what the save cost training
    (a background write that competes for the GIL, the disk or the PCIe bus shows here)."""
    after = [r["seconds"] for r in steps_rec if r["step"] - 1 in saved and not r.get("first")]
    return round(sum(after) / len(after) - steady, 3) if after else None


def startup_breakdown(events: list[dict], steps_rec: list[dict], attempt: int, cli_start: float | None = None) -> dict:
    """Seconds spent in each phase from the CLI's start (the first attempt: when bench.py started the
    CLI) to the end of the attempt's first step."""
    ev = {e["event"]: e for e in events if e.get("attempt") == attempt}
    first = next((r for r in steps_rec if r["attempt"] == attempt), None)
    if not {"launch", "worker_imports", "train_begin"} <= ev.keys() or first is None:
        return {}
    launch, imports, begin = ev["launch"], ev["worker_imports"], ev["train_begin"]
    out = {} if cli_start is None else {"cli_to_launch (imports, preflight)": launch["time"] - cli_start}
    # A spare started and imported before the launch: those phases take no time then.
    marks = imports.get("data", {})  # the Event record's own numbers (state/records.py)
    started = max(marks.get("main_start", imports["time"]), launch["time"])
    imported = max(marks.get("imported", imports["time"]), started)
    out |= {
        "launch_to_worker_process (torchrun)": started - launch["time"],
        "worker_imports (torch, transformers, llamafactory)": imported - started,
        "spare_go (run file to the waiting spare)": imports["time"] - imported,
        "imports_to_train_begin (model load, data, LoRA)": begin["time"] - imports["time"],
        "first_step": first["time"] - begin["time"],
    }
    # Its parts (worker/setup_clock.py); the rest of imports_to_train_begin is the Trainer's setup.
    setup = begin.get("data", {}).get("setup", {})
    out |= {f"  {phase}": seconds for phase, seconds in setup.items()}
    if setup:
        out["  trainer setup (optimizer, resumed state)"] = out[
            "imports_to_train_begin (model load, data, LoRA)"
        ] - sum(setup.values())
    return {k: round(v, 1) for k, v in out.items()}


def table(results: list[dict]) -> str:
    rows = [
        "| case | real tok/s | s/step | peak reserved | MFU (4N) | launch→1st step done | save |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['case']} | {r.get('real_tok_s', '-')} | {r.get('s_per_step', r.get('s_per_step_lf_log', '-'))}"
            f" | {r.get('peak_reserved_gib', '-')} GiB | {str(r['mfu_4n']) + '%' if 'mfu_4n' in r else '-'} | "
            f"{r.get('launch_to_first_step_done_s', '-')} s | {r.get('save_s', '-')} s |"
        )
    return "\n".join(rows)


# Installed on some machines, not in the image (docker/lock): transformers imports them at every worker
# start when they are there (1.5-1.8 s of imports on the H200 machines), so a run measures more than
# the image would.
NOT_IN_IMAGE = ("sklearn", "scipy")


def warn_extra_packages() -> None:
    import importlib.util

    extra = [name for name in NOT_IN_IMAGE if importlib.util.find_spec(name) is not None]
    if extra:
        print(f"bench: {', '.join(extra)} installed here but not in the image: worker imports include them", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ft-bench"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int, default=None, help="SIGKILL the workers at this step (profile cases)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every case (a CPU smoke test: --set bf16=false)",
    )
    ap.add_argument("--cold", action="store_true", help="each case with empty kernel and autotune caches")
    ap.add_argument("--clean", action="store_true", help="delete each case's output_dir after it (a small disk)")
    ap.add_argument("--trace", action="store_true", help="torch.profiler over steps 9-10: where each step's time goes")
    ap.add_argument("--tiny", action="store_true", help="CPU run on the tiny demo Llama (overhead, resume time)")
    ap.add_argument(
        "--no-bytecode",
        action="store_true",
        help="do not compile the stack's bytecode first (the image has it; see compile_bytecode)",
    )
    ap.add_argument(
        "--no-bake",
        action="store_true",
        help="do not bake LlamaFactory's schema first (the image has it; see bake_schema)",
    )
    ap.add_argument("cases", nargs="*", default=list(CASES))
    a = ap.parse_args()
    extra = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in a.set)}
    os.environ.setdefault("HF_HOME", str(a.workdir / "hf"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", str(a.workdir / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(a.workdir / "inductor"))
    if a.tiny:  # CPU: the tiny model, short examples, fp32, every core's process
        os.environ.setdefault("FT_NPROC", "2")  # no GPU to count: the CLI asks for the process count
        extra = {"bf16": False, "cutoff_len": 256, "preprocessing_num_workers": 2, "dataloader_num_workers": 0, **extra}
    warn_extra_packages()
    models = tuple(dict.fromkeys(CASES[c][1].get("model", "llama-8b-random") for c in a.cases))
    build(a.workdir, tiny=a.tiny, models=models)
    if not a.no_bake:
        bake_schema(a.workdir / "baked")
    if not a.no_bytecode:
        seconds = compile_bytecode(a.workdir / "pycache")
        print(f"bytecode: {seconds:.1f} s to compile the stack under {a.workdir / 'pycache'}")
    out = os.environ.get("OUT")
    results = []
    for case in a.cases:
        kill_at = a.kill_at if case.startswith(("profile", "full")) else None
        mfu = not a.tiny and "model" not in CASES[case][1]  # MFU (4N) is the 8B LoRA convention
        results.append(run_case(a.workdir, case, a.steps, kill_at, extra, mfu=mfu, cold=a.cold, trace=a.trace))
        if a.clean:
            shutil.rmtree(a.workdir / "output" / case, ignore_errors=True)
        if out:  # after every case, so a run cut short still reports what it measured
            (Path(out) / "bench.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
