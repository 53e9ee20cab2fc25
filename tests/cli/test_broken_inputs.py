"""A corpus of broken configs and data layouts: each gives one line saying what is wrong and how to fix
it, its exit code, and never a traceback, before any training process starts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from ft_appliance.cli import cli

from tests.helpers import INVENTORIES, LLAMA_8B_CONFIG, REPO


class Case:
    def __init__(self, root: Path, demo_root: Path) -> None:
        self.root = root
        self.data = root / "data"
        shutil.copytree(demo_root / "datasets", self.data / "datasets")
        self.model = self.data / "models" / "tiny-llama"
        shutil.copytree(demo_root / "models" / "tiny-llama", self.model)
        from ft_appliance.tools.demo import demo_config

        self.args = demo_config(self.data)
        self.args["output_dir"] = str(root / "out")
        self.extra: list[str] = ["--nproc", "2"]
        self.text: str | None = None
        self.name = "train.yaml"

    def write(self) -> Path:
        path = self.root / self.name
        path.write_text(self.text if self.text is not None else yaml.safe_dump(self.args))
        return path

    def on(self, card: str, nproc: int | None = None) -> None:
        self.extra = ["--inventory", str(INVENTORIES / f"{card}.json")] + (["--nproc", str(nproc)] if nproc else [])


def set_text(text: str, name: str = "train.yaml") -> Callable[[Case], None]:
    def f(c: Case) -> None:
        c.text, c.name = text, name

    return f


def upd(**kw: object) -> Callable[[Case], None]:
    return lambda c: c.args.update(kw)


def drop(key: str) -> Callable[[Case], None]:
    return lambda c: c.args.pop(key)


def rm(rel: str) -> Callable[[Case], None]:
    def f(c: Case) -> None:
        p = c.data / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return f


def write_file(rel: str, text: str) -> Callable[[Case], None]:
    return lambda c: (c.data / rel).write_text(text)


def write_bytes(rel: str, data: bytes) -> Callable[[Case], None]:
    return lambda c: (c.data / rel).write_bytes(data)


def truncate(rel: str) -> Callable[[Case], None]:
    def f(c: Case) -> None:
        p = c.data / rel
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return f


def dataset_entry(**entry: object) -> Callable[[Case], None]:
    return write_file("datasets/dataset_info.json", json.dumps({"ft_demo": {"file_name": "ft_demo.json", **entry}}))


def override(item: str) -> Callable[[Case], None]:
    return lambda c: c.extra.append(item)


def output_is_a_file(c: Case) -> None:
    (c.root / "afile").write_text("x")
    c.args["output_dir"] = str(c.root / "afile")


def dataset_folder(c: Case) -> None:
    (c.data / "datasets" / "ft_demo.json").unlink()
    (c.data / "datasets" / "ft_demo.json").mkdir()


def big_model_on(card: str) -> Callable[[Case], None]:
    def f(c: Case) -> None:
        (c.model / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
        c.on(card)

    return f


def gpu(card: str, nproc: int | None = None, **kw: object) -> Callable[[Case], None]:
    def f(c: Case) -> None:
        c.args.update(kw)
        c.on(card, nproc)

    return f


def fp8_base_on(card: str, **kw: object) -> Callable[[Case], None]:
    def f(c: Case) -> None:
        gpu(card, bf16=True, **kw)(c)
        c.extra.append("--fp8-base")

    return f


CORPUS: list[tuple[str, Callable[[Case], None], int, str]] = [
    ("invalid yaml", set_text("model_name_or_path: x\n  bad: [\n"), 3, "is not valid YAML at line 2"),
    ("empty file", set_text(""), 3, "is empty"),
    ("yaml list", set_text("- a\n- b\n"), 3, "must be a mapping of LlamaFactory keys"),
    ("json file", set_text('{"stage": "sft"}', "train.json"), 3, "is JSON: write it as YAML"),
    ("unknown key", upd(lerning_rate=1e-4), 3, "unknown key 'lerning_rate': did you mean 'learning_rate'?"),
    ("transformers 4 fsdp key", upd(fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer"), 3, "fsdp_transformer_layer_cls_to_wrap was removed in transformers 5: write fsdp_config: {transformer_layer_cls_to_wrap: [LlamaDecoderLayer]} instead"),
    ("quoted number", upd(lora_rank="8"), 3, "lora_rank is the string '8': write 8 without quotes"),
    ("quoted boolean", upd(do_train="false"), 3, "do_train is the string 'false', which counts as true"),
    ("bad stage", upd(stage="sf"), 3, "stage is 'sf', not one of"),
    ("no do_train", upd(do_train=False), 3, "do_train is not true"),
    ("no dataset", drop("dataset"), 3, "no dataset is set"),
    ("bf16 and fp16", upd(bf16=True, fp16=True), 3, "bf16 and fp16 are both true"),
    ("quantized full", upd(finetuning_type="full", quantization_bit=4), 3, "quantization_bit needs finetuning_type"),
    (
        "missing deepspeed json",
        upd(deepspeed="/nope/ds_z3.json"),
        3,
        "deepspeed config /nope/ds_z3.json does not exist",
    ),
    ("no output_dir", drop("output_dir"), 3, "config has no output_dir"),
    ("bf16 on a CPU run", upd(bf16=True), 3, "bf16/fp16 mixed precision needs a GPU and this is a CPU run"),
    ("liger not installed", upd(enable_liger_kernel=True), 3, "enable_liger_kernel needs liger-kernel"),
    (
        "several nodes, no node rank",
        lambda c: c.extra.extend(["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"]),
        3,
        "2 nodes, but this node's rank is unknown: set NODE_RANK (0 on the head node), or pass --node-rank",
    ),
    ("model dir missing", upd(model_name_or_path="/nowhere/model"), 9, "model directory /nowhere/model does not exist"),
    ("no weights", rm("models/tiny-llama/model.safetensors"), 9, "has no weights (*.safetensors or *.bin)"),
    (
        "no tokenizer",
        lambda c: [(c.model / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        9,
        "has no tokenizer",
    ),
    (
        "hub id offline",
        upd(model_name_or_path="meta-llama/Llama-3.1-8B-Instruct"),
        9,
        "is not a local directory and the hub is offline: copy it to /data/models/Llama-3.1-8B-Instruct",
    ),
    ("unknown template", upd(template="llama_3"), 9, "template 'llama_3' does not exist in LlamaFactory: did you mean"),
    ("template tokens missing", upd(template="qwen"), 9, "template 'qwen' uses <|im_end|>, <|im_start|>"),
    ("dataset dir missing", upd(dataset_dir="/nowhere/datasets"), 9, "dataset_dir /nowhere/datasets does not exist"),
    ("no dataset_info", rm("datasets/dataset_info.json"), 9, "has no dataset_info.json"),
    ("dataset_info not json", write_file("datasets/dataset_info.json", "{oops"), 9, "dataset_info.json is unreadable"),
    ("unknown dataset", upd(dataset="ft_dmeo"), 9, "dataset 'ft_dmeo' is not in"),
    ("dataset file missing", rm("datasets/ft_demo.json"), 9, "ft_demo.json does not exist: copy it into"),
    ("dataset file empty", write_file("datasets/ft_demo.json", ""), 9, "ft_demo.json is empty"),
    ("output not writable", upd(output_dir="/proc/ft-appliance-test/out"), 8, "is not writable by this user"),
    (
        "no gpu, no nproc",
        lambda c: setattr(c, "extra", ["--inventory", str(INVENTORIES / "none.json")]),
        4,
        "no GPU visible: run the container with --gpus all",
    ),
    ("bf16 on T4", gpu("t4", bf16=True), 4, "bf16 needs compute capability 8.0 or newer but Tesla T4 is 7.5"),
    ("too many GPUs", gpu("a10g", nproc=8, bf16=True), 4, "8 GPUs requested but 4 visible: pass --nproc 4"),
    ("old driver", gpu("a100-old-driver", bf16=True), 4, "supports CUDA up to 12.2 but torch was built for CUDA 13.0"),
    ("fa3 on A100", gpu("a100", flash_attn="fa3", bf16=True), 4, "FlashAttention-3 needs compute capability 9.0"),
    ("8B LoRA on T4", big_model_on("t4"), 4, "use QLoRA (quantization_bit: 4)"),
    ("--fp8-base on A100", fp8_base_on("a100"), 4, "--fp8-base needs compute capability 8.9 or newer (Ada, Hopper)"),
    ("--fp8-base with QLoRA", fp8_base_on("h100", quantization_bit=4), 3, "--fp8-base and quantization_bit both"),
    # The config file itself
    ("bare number", set_text("42\n"), 3, "must be a mapping of LlamaFactory keys (key: value lines), not a int (42)"),
    ("bare boolean", set_text("true\n"), 3, "not a bool (True)"),
    ("plain text", set_text("just some text\n"), 3, "not the text 'just some text'"),
    ("output_dir is a file", output_is_a_file, 3, "is a file, not a directory: set output_dir to a folder"),
    ("empty override", override("max_steps="), 3, "override 'max_steps=' has no value: write max_steps=VALUE"),
    # Values that type-check but cannot train
    ("save_steps 0", upd(save_steps=0), 3, "save_steps is 0: set save_steps to 1 or more steps"),
    ("negative save_steps", upd(save_steps=-5), 3, "save_steps is -5"),
    ("cutoff_len 0", upd(cutoff_len=0), 3, "cutoff_len is 0, but tokens per example must be positive"),
    ("batch size 0", upd(per_device_train_batch_size=0), 3, "per_device_train_batch_size is 0"),
    ("negative learning rate", upd(learning_rate=-1e-4), 3, "learning_rate is -0.0001, but the learning rate must"),
    ("max_steps 10**30", upd(max_steps=10**30), 3, "set a positive step count up to 1,000,000,000"),
    ("negative accumulation", upd(gradient_accumulation_steps=-1), 3, "gradient_accumulation_steps is -1"),
    ("resume from nowhere", upd(resume_from_checkpoint="/nowhere/checkpoint-5"), 9, "/nowhere/checkpoint-5 does not exist"),
    # What training will read
    ("dataset invalid json", write_file("datasets/ft_demo.json", '[{"instruction": "a" "output": "b"}]'), 9, "is not valid JSON (line 1, column 22"),
    ("dataset []", write_file("datasets/ft_demo.json", "[]"), 9, "ft_demo.json has no examples"),
    ("dataset latin-1", write_bytes("datasets/ft_demo.json", '[{"instruction": "café", "output": "b"}]'.encode("latin-1")), 9, "is not UTF-8 (line 1, byte 21)"),
    ("dataset columns", dataset_entry(columns={"prompt": "question", "response": "answer"}), 9, "example 1: no column 'question' (the prompt column"),
    ("dataset sharegpt on alpaca data", dataset_entry(formatting="sharegpt"), 9, "no column 'conversations' (the messages column"),
    ("dataset folder for a file", dataset_folder, 9, "ft_demo.json is a folder where a data file should be"),
    ("dataset list skips nothing", lambda c: (c.args.update(dataset=["ft_demo"]), rm("datasets/ft_demo.json")(c)), 9, "ft_demo.json does not exist"),
    ("truncated weights", truncate("models/tiny-llama/model.safetensors"), 9, "model.safetensors is truncated"),
    ("broken tokenizer.json", write_file("models/tiny-llama/tokenizer.json", '{"model": {"type": "BPE", "vocab": '), 9, "tokenizer.json does not load"),
    # Packages the image lacks (LlamaFactory's own example configs use them)
    ("wandb", upd(report_to="wandb"), 8, 'report_to: wandb needs the wandb package, which this installation lacks: rebuild the image with --build-arg EXTRAS="wandb"'),
    ("galore", upd(use_galore=True), 8, "use_galore needs the galore-torch package"),
    ("apollo", upd(use_apollo=True), 8, "use_apollo needs the apollo-torch package"),
    ("badam", upd(use_badam=True), 8, "use_badam needs the badam package"),
    ("adam-mini", upd(use_adam_mini=True), 8, "use_adam_mini needs the adam-mini package"),
    ("qlora", upd(quantization_bit=4), 8, "quantization_bit (bnb) needs the bitsandbytes package"),
    ("mixture of depths", upd(mixture_of_depths="convert"), 8, "mixture_of_depths needs the mixture-of-depth package"),
    ("zero2 on cpu", upd(finetuning_type="full", deepspeed=str(REPO / "configs" / "deepspeed" / "ds_z2_config.json")), 3, "DeepSpeed ZeRO-2 fails on CPU processes: its gradient all-gather over gloo"),
]  # fmt: skip
# Cases about a CPU run: `check` judges them as one (with --nproc).
CPU_RUN = {"bf16 on a CPU run", "liger not installed", "zero2 on cpu"}


@pytest.fixture(scope="module", autouse=True)
def no_gpu_inventory() -> None:
    (INVENTORIES / "none.json").exists() or pytest.fail("tests/fixtures/inventories/none.json is missing")


@pytest.mark.parametrize(("name", "breakage", "code", "needle"), CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_input(demo_root: Path, tmp_path: Path, name: str, breakage, code: int, needle: str) -> None:
    case = Case(tmp_path, demo_root)
    breakage(case)
    cfg = case.write()
    res = CliRunner().invoke(cli, ["train", str(cfg), *case.extra])
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit) or res.exception is None, res.exception
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("[ft] warning")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ft-appliance: error: ")
    assert needle in lines[0]
    assert not (tmp_path / "out" / ".ft" / "attempts").exists()  # nothing was launched


@pytest.mark.parametrize(("name", "breakage", "code", "needle"), CORPUS, ids=[c[0] for c in CORPUS])
def test_check_reports_it_too_without_nproc(demo_root: Path, tmp_path: Path, name: str, breakage, code, needle) -> None:
    """`check` on a machine without GPUs (the autouse no-GPU inventory) and without --nproc: the finding
    is among the report's lines and decides the exit code; no traceback, nothing launched."""
    case = Case(tmp_path, demo_root)
    breakage(case)
    cfg = case.write()
    cpu_default = case.extra[:2] == ["--nproc", "2"] and name not in CPU_RUN
    extra = case.extra[2:] if cpu_default else case.extra
    res = CliRunner().invoke(cli, ["check", str(cfg), *extra])
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit) or res.exception is None, res.exception
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / ".ft").exists()


def test_check_reports_every_finding_at_once(demo_root: Path, tmp_path: Path) -> None:
    case = Case(tmp_path, demo_root)
    case.args.update(lerning_rate=1e-4, cutoff_len=0, report_to="wandb", dataset="ft_dmeo")
    res = CliRunner().invoke(cli, ["check", str(case.write()), "--json"])
    report = json.loads(res.stdout)
    found = {p["check"] for p in report["problems"] if p["severity"] == "error"}
    assert {"gpu.none", "config.unknown_key", "config.value", "env.package", "data.unknown"} <= found
    assert res.exit_code == report["exit_code"] == 3  # the most basic: the config


def test_corpus_covers_every_preflight_exit_code() -> None:
    assert {c[2] for c in CORPUS} == {3, 4, 8, 9}
    assert len(CORPUS) >= 60


def test_demo_config_passes_preflight_on_cpu(demo_root: Path, tmp_path: Path) -> None:
    case = Case(tmp_path, demo_root)
    res = CliRunner().invoke(cli, ["check", str(case.write()), "--nproc", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["effective_batch"] == 8 and report["inventory"] is None
    assert [p for p in report["problems"] if p["severity"] == "error"] == []


def test_demo_config_on_a_recorded_h100_gets_the_profile_and_its_worker_tweaks(demo_root: Path, tmp_path: Path) -> None:
    case = Case(tmp_path, demo_root)
    case.on("h100")
    res = CliRunner().invoke(cli, ["check", str(case.write()), *case.extra, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["updates"]["bf16"] is True and report["updates"]["neat_packing"] is True
    tweaks = ["blockdiag-attention", "lora-inputs-in-compute-dtype", "lora-add-in-gemm", "lora-fused-projections"]
    assert report["tweaks"] == tweaks
    assert any(
        "FlashAttention-2 varlen kernel, or by FlexAttention with a block-sparse mask" in d for d in report["decisions"]
    )

    res = CliRunner().invoke(cli, ["check", str(case.write()), *case.extra, "--json", "--no-profile"])
    report = json.loads(res.stdout)
    assert report["tweaks"] == [] and "neat_packing" not in report["updates"]
