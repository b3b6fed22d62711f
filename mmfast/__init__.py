"""mmfast: fused GPU/CPU kernels for multimodal vision models (CLIP, SigLIP, Flamingo, SAM).

Every kernel is a PyTorch operator (torch.ops.mmfast.*); the functions here check arguments,
choose the backend (mmfast.backend) and carry autograd. The native extension mmfast._C is
optional at import: without it a warning says why and only the reference backend runs.
"""
import warnings as _warnings

from mmfast import backend as _backend_module
from mmfast.backend import (BackendUnavailableError, available_backends, get_backend, set_backend,
                            use_backend)

__version__ = "0.1.0"

if _backend_module._C is None:
    _warnings.warn(f"mmfast: the native extension mmfast._C is not available ({_backend_module._C_error}); "
                   "only backend='reference' (and Triton) will run. Build it with `make build`.", stacklevel=2)

from mmfast.ops.contrastive_loss import clip_loss, siglip_loss  # noqa: E402
from mmfast.ops.cross_attention import cross_attention  # noqa: E402
from mmfast.ops.sam_attention import sam_attention  # noqa: E402
from mmfast.ops.similarity_softmax import similarity_softmax  # noqa: E402

# Loaded on first use, as torch.nn is after `import torch`: `import mmfast` then `mmfast.nn.ClipLoss` or
# `mmfast.patch(model)` works without importing the submodules by hand.
_LAZY = {"nn": ("mmfast.nn", None), "analysis": ("mmfast.analysis", None), "patch": ("mmfast.patching", "patch"), "unpatch": ("mmfast.patching", "unpatch"),
         "patch_open_clip": ("mmfast.patching", "patch_open_clip"),
         "unpatch_open_clip": ("mmfast.patching", "unpatch_open_clip"),
         "contrastive_step": ("mmfast.gradcache", "contrastive_step")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["similarity_softmax", "clip_loss", "siglip_loss", "cross_attention", "sam_attention", "set_backend", "get_backend", "use_backend", "available_backends",
           "BackendUnavailableError", "__version__", "nn", "analysis", "patch", "unpatch", "patch_open_clip", "unpatch_open_clip", "contrastive_step"]
