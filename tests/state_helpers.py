"""Helpers shared by the tests that check an optimizer is left exactly as it was"""
import torch


def deep_equal(a, b):
    "`a` and `b` hold the same values: tensors equal in shape, dtype and value, containers element by element"
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return type(a) == type(b) and a == b
