"""moeconv_torch: run moeconv-format Mixture-of-Experts models in PyTorch, in about their file size.

Three ways in::

    import moeconv_torch
    model = moeconv_torch.load_model("out/mixtral-nf4", device="cuda")          # 1. direct

    from transformers import AutoModelForCausalLM                               # 2. transformers:
    model = AutoModelForCausalLM.from_pretrained("out/mixtral-nf4")             #    the import above
                                                                                #    registered "moeconv"
    # 3. command line: moeconv eval / moeconv generate

Routed experts stay packed in :class:`QuantizedExperts` (each expert with its
own scheme) and are dequantized per active expert during the forward pass;
quantized shared experts and dense layers use :class:`QuantizedLinear`.  Both
modules work in any PyTorch code.  This package never imports the converter.
"""

from .dequant import dequantize
from .hf_quantizer import MoeconvConfig, MoeconvHfQuantizer
from .loading import is_converted, load_any_model, load_model
from .modules import (
    ClampedSwiGLU,
    GatedActivation,
    PackedExperts,
    PackedGroup,
    PackedWeight,
    QuantizedExperts,
    QuantizedLinear,
    WeightSpec,
)

__all__ = [
    "ClampedSwiGLU",
    "GatedActivation",
    "MoeconvConfig",
    "MoeconvHfQuantizer",
    "PackedExperts",
    "PackedGroup",
    "PackedWeight",
    "QuantizedExperts",
    "QuantizedLinear",
    "WeightSpec",
    "dequantize",
    "is_converted",
    "load_any_model",
    "load_model",
]
