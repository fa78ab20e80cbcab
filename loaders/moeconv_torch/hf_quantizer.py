"""transformers integration: ``from_pretrained`` on a converted model through transformers' quantizer registry.

Importing ``moeconv_torch`` registers the ``"moeconv"`` quantization method
(``register_quantization_config`` / ``register_quantizer``), so
``AutoModelForCausalLM.from_pretrained(path)`` on a directory (or Hub repo)
whose config.json says ``quantization_config.quant_method == "moeconv"``
returns the packed model.  transformers keeps doing everything it does for any
model (plain tensors, renamings, dtype, ``device_map``/accelerate placement,
tying); the quantizer only

* before loading, swaps in :class:`QuantizedExperts` / :class:`QuantizedLinear`
  with meta buffers of the packed sizes, so ``device_map="auto"`` plans with
  the real (packed) memory and transformers materializes the buffers on their
  planned devices, and tells transformers not to report the packed tensors as
  missing (model side) or unexpected (file side);
* after loading, copies the packed parts from the shards into those buffers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from moeconv_numpy.metadata import FORMAT_VERSION
from moeconv_numpy.reader import INDEX_FILE

from .loading import LoadPlan, fill_packed, quantize_modules, read_plan
from .modules import PACKED_SUFFIXES

__all__ = ["QUANT_METHOD", "MoeconvConfig", "MoeconvHfQuantizer", "register"]

QUANT_METHOD = "moeconv"
#: Packed tensors: missing from the model's point of view, unexpected from the file's.
_PACKED_KEYS = rf"\.({'|'.join(PACKED_SUFFIXES)})$"


class MoeconvConfig(QuantizationConfigMixin):
    """A converted model's ``quantization_config``: method and format version; other keys are kept as they are.

    The per-weight facts (scheme, bits, group size of every expert) live in the
    shards' metadata, not here, so this config carries nothing the loader needs.
    """

    def __init__(self, format_version: str = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        for key, value in kwargs.items():
            setattr(self, key, value)


class MoeconvHfQuantizer(HfQuantizer):
    """Loads pre-quantized moeconv checkpoints (there is no quantize-on-load: use ``moeconv convert``)."""

    requires_calibration = True

    def __init__(self, quantization_config: MoeconvConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.plan: LoadPlan | None = None

    def validate_environment(self, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("moeconv models cannot be offloaded to disk: give a device_map without 'disk'")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.plan = read_plan(_model_directory(model, checkpoint_files))
        quantize_modules(model, self.plan, torch.device("meta"))
        for attribute in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
            setattr(model, attribute, {*(getattr(model, attribute, None) or ()), _PACKED_KEYS})
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        fill_packed(model, self.plan)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _model_directory(model, checkpoint_files) -> Path:
    """The local directory of the checkpoint: where transformers put the shards (a Hub snapshot or the path).

    transformers fetches only ``model.safetensors`` for a one-shard Hub repo;
    the index, which the format requires, is then fetched next to it.
    """
    if not checkpoint_files:
        raise ValueError("a moeconv model is loaded from its safetensors shards; none were found")
    directory = Path(checkpoint_files[0]).parent
    if not (directory / INDEX_FILE).is_file():
        from transformers.utils import cached_file

        directory = Path(cached_file(model.config.name_or_path, INDEX_FILE)).parent
    return directory


def register() -> None:
    """Register the method with transformers (idempotent: a second import or reload does nothing)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoeconvConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoeconvHfQuantizer)


register()
