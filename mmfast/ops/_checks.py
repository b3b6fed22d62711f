"""Argument checks shared by every functional op: each error names the user's argument."""
from __future__ import annotations

import numbers

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """A non-empty floating tensor of the given rank."""
    tensor_shape(name, x, ndim)
    return x


def tensor_shape(name: str, x, ndim: int | tuple[int, ...]) -> torch.Size:
    """check_tensor's checks; returns x.shape, so that a caller comparing sizes reads it once (each tensor
    attribute read costs ~0.1 us, and an op call's checks read dozens)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mmfast: {name} must be a torch.Tensor, got {type(x).__name__}")
    shape = x.shape
    if len(shape) != ndim if isinstance(ndim, int) else len(shape) not in ndim:
        want = ndim if isinstance(ndim, int) else " or ".join(str(n) for n in ndim)
        raise ValueError(f"mmfast: {name} must have {want} dimensions, got shape {tuple(shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"mmfast: {name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if 0 in shape:
        raise ValueError(f"mmfast: {name} must not be empty, got shape {tuple(shape)}")
    return shape


def check_same_device_dtype(names: tuple[str, ...], *xs: torch.Tensor, same_dtype: bool = True) -> torch.device:
    """All on one device and (unless same_dtype=False: composite ops under torch.autocast, whose inner ops
    cast) of one dtype. Returns the device."""
    first_name, first = names[0], xs[0]
    device, dtype = first.device, first.dtype
    for name, x in zip(names[1:], xs[1:]):
        if x.device != device:
            raise ValueError(f"mmfast: {name} is on {x.device} but {first_name} is on {device}")
        if same_dtype and x.dtype != dtype:
            raise TypeError(f"mmfast: {name} is {x.dtype} but {first_name} is {dtype}; pass one dtype")
    return device


def check_dim_match(name_a: str, a: torch.Tensor, dim_a: int, name_b: str, b: torch.Tensor, dim_b: int, what: str) -> None:
    if a.shape[dim_a] != b.shape[dim_b]:
        raise ValueError(f"mmfast: {what} mismatch: {name_a} has {a.shape[dim_a]} (shape {tuple(a.shape)}) "
                         f"but {name_b} has {b.shape[dim_b]} (shape {tuple(b.shape)})")


def check_scalar(name: str, value, like: torch.Tensor) -> None:
    """value is a Python number, or a 0-dim or shape-[1] floating tensor on like's device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"mmfast: {name} must be a float, a 0-dim or a shape-[1] tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"mmfast: {name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"mmfast: {name} is on {value.device} but the features are on {like.device}")
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"mmfast: {name} must be a float or a tensor, got {type(value).__name__}")


def scalar_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A Python number, 0-dim or shape-[1] tensor as a 0-dim fp32 tensor on like's device.

    Gradients flow back to a tensor argument through the reshape/cast (autograd views)."""
    check_scalar(name, value, like)
    if isinstance(value, torch.Tensor):
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if value.dim():
            value = value.reshape(())
        return value if value.dtype == dtype else value.to(dtype)  # no op call for the usual 0-dim fp32 scale
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((), float(value), dtype=dtype, device=like.device)
