"""Adaptation methods; importing this package registers every method module below."""

from tta.methods import tpt, zero, zeroshot  # noqa: F401
from tta.methods import gda, tda, tfup  # noqa: F401  (cache methods: tda, tfup, gda)
from tta.methods import difftpt, rlcf  # noqa: F401  (heavy episodic methods)
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, get_method_class, list_methods, register

__all__ = ["Method", "MethodInput", "MethodOptions", "MethodOutput", "get_method_class", "list_methods", "register"]
