"""Which optional packages a config needs, following LlamaFactory's own checks (hparams/parser.py
`check_version(..., mandatory=True)`, model_utils/quantization.py) and the trainer integrations that
`report_to` turns on. Pure: the caller looks the distributions up.

Each need names the image extra that carries it (`docker build --build-arg EXTRAS="..."`, pinned in
docker/lock/extras/), or none when the image cannot carry it (a GPU build of flash-attn, unsloth).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config.args import names


@dataclass(frozen=True)
class Need:
    setting: str
    """The config setting that needs it, as the user wrote it."""
    dist: str
    """The distribution LlamaFactory checks for (importlib.metadata name)."""
    extra: str | None
    """The image extra that installs it (docker/lock/extras/EXTRA.txt)."""
    instead: str
    """The way out without it."""


REPORTERS = {
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "swanlab": ("swanlab", "swanlab"),
    "comet_ml": ("comet-ml", None),
    "clearml": ("clearml", None),
    "neptune": ("neptune", None),
    "dvclive": ("dvclive", None),
}
FLAGS = {
    "use_galore": ("galore-torch", "galore", "remove use_galore"),
    "use_apollo": ("apollo-torch", "apollo", "remove use_apollo"),
    "use_badam": ("badam", "badam", "remove use_badam"),
    "use_adam_mini": ("adam-mini", "adam-mini", "remove use_adam_mini"),
    "use_swanlab": ("swanlab", "swanlab", "remove use_swanlab"),
    "use_unsloth": ("unsloth", None, "remove use_unsloth"),
    "fp8": ("torchao", "torchao", "remove fp8"),
}
QUANT_METHODS = {"bnb": "bitsandbytes", "bitsandbytes": "bitsandbytes", "hqq": "hqq", "eetq": "eetq"}
PRE_QUANTIZED = {"gptq": "gptqmodel", "awq": "autoawq", "aqlm": "aqlm"}


def needs(args: Mapping[str, Any], model_config: Mapping[str, Any] | None = None) -> list[Need]:
    found = [
        Need(f"report_to: {r}", dist, extra, "set report_to: none")
        for r in names(args.get("report_to"))
        if r in REPORTERS
        for dist, extra in [REPORTERS[r]]
    ]
    for key, (dist, extra, instead) in FLAGS.items():
        if args.get(key):
            found.append(Need(key, dist, extra, instead))
    if args.get("mixture_of_depths"):
        found.append(Need("mixture_of_depths", "mixture-of-depth", "mod", "remove mixture_of_depths"))
    if args.get("quantization_bit"):
        method = str(args.get("quantization_method") or "bnb")
        dist = QUANT_METHODS.get(method, method)
        found.append(
            Need(
                f"quantization_bit ({method})",
                dist,
                "bitsandbytes" if dist == "bitsandbytes" else None,
                "remove quantization_bit",
            )
        )
    optim = str(args.get("optim") or "")
    if "bnb" in optim or "8bit" in optim:
        found.append(Need(f"optim: {optim}", "bitsandbytes", "bitsandbytes", "use optim: adamw_torch"))
    if str(args.get("flash_attn")) == "fa2":
        found.append(Need("flash_attn: fa2", "flash-attn", None, "set flash_attn: sdpa"))
    quant = (model_config or {}).get("quantization_config")
    method = str(quant.get("quant_method", "")) if isinstance(quant, dict) else ""
    if method in PRE_QUANTIZED:
        found.append(
            Need(f"a model quantized with {method.upper()}", PRE_QUANTIZED[method], None, "use the unquantized model")
        )
    return found


def missing_message(need: Need) -> str:
    build = f'rebuild the image with --build-arg EXTRAS="{need.extra}" (README: Extras), or ' if need.extra else ""
    return f"{need.setting} needs the {need.dist} package, which this installation lacks: {build}{need.instead}"
