"""Adaptation methods; importing this package registers every method module below."""

from tta.methods import auto, boostadapter, difftpt, dota, dpe, gda, rlcf, tda, tfup, tpt, zero, zeroshot  # noqa: F401  (auto escalates zeroshot -> zero -> tpt)
from tta.methods.base import (
    Method,
    MethodInput,
    MethodOptions,
    MethodOutput,
    get_method_class,
    list_methods,
    register,
)

__all__ = ["Method", "MethodInput", "MethodOptions", "MethodOutput", "get_method_class", "list_methods", "register"]
