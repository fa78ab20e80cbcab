"""moeconv_numpy: the reference reader of the moeconv format (v1), NumPy only.

Other runtimes import this package to read converted Mixture-of-Experts
checkpoints without the converter, torch or transformers; it needs nothing but
NumPy.  Everything it does is specified in ``spec/FORMAT.md``.

Example::

    import moeconv_numpy
    model = moeconv_numpy.open_model("out/mixtral-int4")       # reads config.json + index only
    info = model.weights["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    info.scheme, info.bits, info.group_size, info.shape       # ('int4', 4, 64, (384, 256))
    w = model.dequantize(info.name)                            # float32 [out, in]
    g = model.tensor("model.layers.0.block_sparse_moe.gate.weight")  # router: BF16 -> float32
    model.verify()                                             # structure + every sha256

Every problem found in a file raises :class:`FormatError` (a ``ValueError``)
whose message names the file, the tensor and what is wrong; asking for a name
the model does not have raises ``KeyError``.
"""

from .dequant import dequantize
from .errors import FormatError
from .header import read_header
from .metadata import FORMAT_VERSION, ROUTER_DTYPES, WeightInfo
from .reader import Model, VerifyReport, check_shard, open_model
from .schemes import SCHEMES, code_bits, scheme_info, stored_bits, tensor_layout

__all__ = [
    "FORMAT_VERSION",
    "FormatError",
    "Model",
    "ROUTER_DTYPES",
    "SCHEMES",
    "VerifyReport",
    "WeightInfo",
    "check_shard",
    "code_bits",
    "dequantize",
    "open_model",
    "read_header",
    "scheme_info",
    "stored_bits",
    "tensor_layout",
]
