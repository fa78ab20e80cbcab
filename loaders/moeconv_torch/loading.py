"""Rebuild a runnable transformers model from a converted directory, in about the file's memory.

The steps, shared by :func:`load_model` and the transformers quantizer
(``hf_quantizer.py``):

1. :func:`read_plan` opens the directory with ``moeconv_numpy`` (which checks
   the structure and raises ``FormatError``) and sorts its weights into routed
   experts by layer, quantized dense/shared linears, and plain tensors.
2. :func:`quantize_modules` swaps each layer's experts module for a
   :class:`QuantizedExperts` and each quantized linear for a
   :class:`QuantizedLinear`, with empty packed buffers (on the meta device
   while the model is a skeleton, so nothing BF16-sized is ever allocated).
3. :func:`fill_packed` copies the packed parts from the memory-mapped shards
   into those buffers, wherever they were placed.

:func:`load_model` adds the plain tensors, weight tying and the non-persistent
buffers that transformers' own loader would otherwise provide.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moeconv_numpy.errors import FormatError
from moeconv_numpy.metadata import WeightInfo
from moeconv_numpy.reader import CONFIG_FILE, INDEX_FILE, Model, open_model

from .architectures import Architecture, architecture_for, find_experts_modules
from .modules import QuantizedLinear, WeightSpec

__all__ = ["LoadPlan", "read_plan", "quantize_modules", "fill_packed", "load_model", "is_converted", "load_any_model"]

PROJS = ("gate", "up", "down")


@dataclass(frozen=True)
class Target:
    """Where one quantized weight goes: ``model.<module>.<storage>.set_parts(slot, parts)``."""

    module: str
    storage: str
    slot: int
    info: WeightInfo


@dataclass
class LoadPlan:
    """What a converted directory holds, sorted by where it goes in the model."""

    model_file: Model
    arch: Architecture
    #: layer -> proj -> expert -> weight
    experts: dict[int, dict[str, dict[int, WeightInfo]]] = field(default_factory=dict)
    #: quantized shared-expert and dense weights by logical name
    linears: dict[str, WeightInfo] = field(default_factory=dict)
    #: plain tensor name -> shard file name
    plain: dict[str, str] = field(default_factory=dict)
    #: filled by quantize_modules: where each quantized weight goes
    targets: list[Target] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.model_file.path


def _spec(info: WeightInfo) -> WeightSpec:
    return WeightSpec(info.scheme, info.shape, info.group_size, info.double_quant)


def read_plan(path: str | os.PathLike) -> LoadPlan:
    """Open and check a converted directory (``FormatError`` if damaged) and sort its weights."""
    model_file = open_model(path)
    config_path = model_file.path / CONFIG_FILE
    try:
        arch = architecture_for(model_file.config.get("model_type"), str(config_path))
    except ValueError as exc:
        raise FormatError(config_path, str(exc).removeprefix(f"{config_path}: ")) from None
    plan = LoadPlan(model_file, arch)
    for name, info in model_file.weights.items():
        if info.role != "routed_expert":
            plan.linears[name] = info
        elif info.proj not in PROJS:
            raise FormatError(model_file.path / info.shard, f"a routed expert needs proj gate, up or down, got {info.proj!r}", name)
        else:
            slot = plan.experts.setdefault(info.layer, {}).setdefault(info.proj, {})
            if info.expert in slot:  # two weights for one expert slot: the model is ambiguous, refuse it
                raise FormatError(
                    model_file.path / info.shard,
                    f"layer {info.layer} expert {info.expert} {info.proj} is also described by "
                    f"{slot[info.expert].name!r}",
                    name,
                )
            slot[info.expert] = info
    with open(model_file.path / INDEX_FILE, encoding="utf-8") as index:
        weight_map = json.load(index)["weight_map"]
    plan.plain = {name: weight_map[name] for name in model_file.plain_tensor_names}
    return plan


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _layer_specs(plan: LoadPlan, layer: int, num_experts: int) -> dict[str, list[WeightSpec]]:
    """Per-projection specs of a layer in expert order; every expert must have all three weights."""
    specs = {}
    for proj in PROJS:
        found = plan.experts[layer].get(proj, {})
        missing = [e for e in range(num_experts) if e not in found]
        extra = sorted(e for e in found if e >= num_experts)
        if missing or extra:
            problem = f"expert {missing[0]} has no {proj} weight" if missing else f"expert {extra[0]} is out of range"
            raise FormatError(plan.path, f"layer {layer}: {problem}; the model has {num_experts} experts per layer")
        specs[proj] = [_spec(found[e]) for e in range(num_experts)]
    return specs


def quantize_modules(model: nn.Module, plan: LoadPlan, device: torch.device | str) -> None:
    """Replace the experts modules and quantized linears of ``model`` by packed modules with empty buffers.

    Records in ``plan.targets`` where each weight goes, for :func:`fill_packed`.
    """
    experts_paths = find_experts_modules(model, plan.arch)
    for layer in sorted(plan.experts):
        path = experts_paths.get(layer)
        if path is None:
            raise FormatError(plan.path, f"layer {layer} has routed experts but the model has no experts module there")
        original = model.get_submodule(path)
        specs = _layer_specs(plan, layer, original.num_experts)
        replacement = plan.arch.build(original, specs["gate"], specs["up"], specs["down"], device)
        dense = sum(p.numel() for name, p in original.named_parameters() if not name.endswith("bias"))
        expected = 3 * replacement.num_experts * replacement.hidden_dim * replacement.intermediate_dim
        if dense != expected:
            raise FormatError(
                plan.path,
                f"layer {layer}: expert weights of shape {list(replacement.gate_proj.shape)} do not fit {path} "
                f"({dense} weights, the file describes {expected})",
            )
        _replace(model, path, replacement)
        plan.targets += [
            Target(path, f"{proj}_proj", expert, info)
            for proj, by_expert in plan.experts[layer].items()
            for expert, info in by_expert.items()
        ]
    for name, info in plan.linears.items():
        path = plan.arch.module_name(name).removesuffix(".weight")
        original = model.get_submodule(path) if name.endswith(".weight") else None
        if not isinstance(original, nn.Linear):
            raise FormatError(plan.path / info.shard, "quantized weight is not the weight of a linear layer of the model", name)
        if (original.out_features, original.in_features) != info.shape:
            raise FormatError(
                plan.path / info.shard,
                f"shape {list(info.shape)} does not fit {path} [{original.out_features}, {original.in_features}]",
                name,
            )
        bias = original.bias
        dtype = bias.dtype if bias is not None else torch.bfloat16
        _replace(model, path, QuantizedLinear(_spec(info), bias=bias is not None, device=device, dtype=dtype))
        plan.targets.append(Target(path, "packed", 0, info))


def fill_packed(model: nn.Module, plan: LoadPlan) -> None:
    """Copy every quantized weight's parts from the shards into the packed buffers that
    :func:`quantize_modules` made, in place, on whatever device they were put."""
    by_shard: dict[str, list[Target]] = defaultdict(list)
    for target in plan.targets:
        by_shard[target.info.shard].append(target)
    storages = {}
    for target in plan.targets:
        key = (target.module, target.storage)
        if key not in storages:
            storages[key] = getattr(model.get_submodule(target.module), target.storage)
            if any(buffer.is_meta for buffer in storages[key].buffers()):
                raise RuntimeError(
                    f"{target.module}.{target.storage}: packed buffers are on the meta device (offloaded buffers "
                    "are not supported; keep offload_buffers=False)"
                )
    for shard, targets in by_shard.items():
        with safe_open(plan.path / shard, framework="pt", device="cpu") as tensors:
            for target in targets:
                parts = {suffix: tensors.get_tensor(name) for suffix, name in target.info.tensors.items()}
                storages[target.module, target.storage].set_parts(target.slot, parts)


def _keep_fp32(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Names that transformers keeps in float32 at this dtype (its ``_keep_in_fp32_modules*`` rules)."""
    names = []
    if dtype in (torch.float16, torch.bfloat16):
        names += getattr(model, "_keep_in_fp32_modules_strict", None) or []
    if dtype == torch.float16:
        names += getattr(model, "_keep_in_fp32_modules", None) or []
    return tuple(names)


def _load_plain(model: nn.Module, plan: LoadPlan, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Put every plain tensor into the model (cast like transformers would); return the names it has no place for."""
    keep_fp32 = _keep_fp32(model, dtype)
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in plan.plain.items():
        by_shard[shard].append(name)
    unexpected = []
    for shard, names in by_shard.items():
        with safe_open(plan.path / shard, framework="pt", device="cpu") as tensors:
            for name in names:
                target = plan.arch.module_name(name)
                module_path, _, attr = target.rpartition(".")
                try:
                    module = model.get_submodule(module_path)
                except AttributeError:
                    module = None
                slots = module._parameters if module is not None and attr in module._parameters else None
                if slots is None and module is not None and attr in module._buffers:
                    slots = module._buffers
                if slots is None or slots[attr] is None:
                    unexpected.append(name)
                    continue
                value = tensors.get_tensor(name)
                if tuple(value.shape) != tuple(slots[attr].shape):
                    raise FormatError(
                        plan.path / shard, f"shape {list(value.shape)} does not fit {target} {list(slots[attr].shape)}", name
                    )
                wanted = torch.float32 if value.is_floating_point() and any(k in target for k in keep_fp32) else slots[attr].dtype
                value = value.to(device=device, dtype=wanted)
                if slots is module._parameters:
                    value = nn.Parameter(value, requires_grad=value.is_floating_point())
                value._is_hf_initialized = True
                slots[attr] = value
    return unexpected


def _finish_skeleton(model: nn.Module, plan: LoadPlan, device: torch.device) -> None:
    """Tie weights, then give the non-persistent buffers (rotary tables) real values as transformers does."""
    missing = {name for name, param in model.named_parameters(remove_duplicate=False) if param.is_meta}
    model.tie_weights(missing_keys=missing, recompute_mapping=True)
    persistent = set(model.state_dict(keep_vars=True))
    still = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if still:
        more = f" (and {len(still) - 1} more)" if len(still) > 1 else ""
        raise FormatError(plan.path, f"no stored tensor for the model's {still[0]!r}{more}")
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name not in persistent:
            module_path, _, attr = name.rpartition(".")
            model.get_submodule(module_path)._buffers[attr] = torch.empty_like(buffer, device=device)
    model.initialize_weights()


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    verify: bool = False,
):
    """Load a converted directory as a transformers causal LM whose experts stay packed.

    The architecture is built from config.json on the meta device; routed
    experts become :class:`QuantizedExperts` (each expert with its own scheme),
    quantized shared/dense weights :class:`QuantizedLinear`; every other tensor
    (routers included, BF16 or wider) is read from the memory-mapped shards
    straight into place on ``device``.  ``verify=True`` also checks every
    tensor's sha256 first (structure is always checked).  A damaged directory
    raises ``moeconv_numpy.FormatError``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    plan = read_plan(path)
    if verify:
        plan.model_file.verify()
    device = torch.device(device)
    config = AutoConfig.from_pretrained(plan.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantize_modules(model, plan, device)
    fill_packed(model, plan)
    unexpected = _load_plain(model, plan, device, dtype)
    if unexpected:
        warnings.warn(
            f"{plan.path}: {len(unexpected)} stored tensor(s) have no place in {type(model).__name__} and were "
            f"skipped, e.g. {unexpected[0]!r}",
            stacklevel=2,
        )
    _finish_skeleton(model, plan, device)
    if (plan.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(plan.path)
    return model.eval()


def is_converted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local directory whose config.json names the moeconv quantization method."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (ValueError, OSError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == "moeconv"


def load_any_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, verify: bool = False
):
    """A converted directory through :func:`load_model`, any other model through transformers' ``from_pretrained``."""
    if is_converted(path):
        return load_model(path, device=device, dtype=dtype, verify=verify)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
