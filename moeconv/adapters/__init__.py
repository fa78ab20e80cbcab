"""Architecture adapters: one small declarative module per checkpoint layout.

Every module of this package (other than the framework's own) is imported
here and registers its :class:`~moeconv.adapters.base.Adapter`, so supporting
a new architecture is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    DENSE,
    REGISTRY,
    ROUTED,
    SHARED,
    Adapter,
    AdapterError,
    Item,
    Restore,
    adapter_for_config,
    get_adapter,
    supported_model_types,
)

_FRAMEWORK = {"base", "fp8", "fused"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _FRAMEWORK:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DENSE",
    "REGISTRY",
    "ROUTED",
    "SHARED",
    "Adapter",
    "AdapterError",
    "Item",
    "Restore",
    "adapter_for_config",
    "get_adapter",
    "supported_model_types",
]
