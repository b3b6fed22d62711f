"""The eager entry points of the native forward operators: mmfast._C.<op> (csrc/mmfast.cpp) calls the same
dispatcher operator as torch.ops.mmfast.<op> (same autograd, kernels and Python dispatch modes) without
torch.ops' parsing of the arguments against the schema and boxing them: on tiny inputs, one thread, 2-core
dev CPU, mmfast::cross_attention took 5.5 us through torch.ops and 3.9 us through its entry point."""
from __future__ import annotations

import torch
from torch.overrides import has_torch_function

from mmfast import backend as _backend


def entry(name: str):
    """mmfast._C.<name>, or None: no extension, or one built before the entry points existed."""
    return getattr(_backend._C, name, None)


def usable(tensors: tuple) -> bool:
    """Whether a call on these arguments may take an entry point: not while torch.compile traces (it needs
    the torch.ops operator), and no __torch_function__ to honour (torch.ops consults it, an entry point does
    not)."""
    return not torch.compiler.is_compiling() and not has_torch_function(tensors)
