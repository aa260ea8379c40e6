"""Adaptation methods; importing this package registers every method module in this folder.

Modules are discovered, not listed: adding a method is adding one file here with a `@register`
class (its facts on the class), and nothing else changes.
"""

import importlib
import pkgutil

from tta.methods.base import (
    Method,
    MethodInput,
    MethodOptions,
    MethodOutput,
    get_method_class,
    list_methods,
    register,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base" and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Method", "MethodInput", "MethodOptions", "MethodOutput", "get_method_class", "list_methods", "register"]
