"""One-line patching of existing models and training scripts (Liger-Kernel's apply_liger_kernel_to_* style).

`patch(model)` swaps, in place, every module of `model` that mmfast has a drop-in for:

| upstream class                                              | mmfast.nn drop-in              |
| segment_anything.modeling.transformer.Attention             | SamAttention                   |
| segment_anything.modeling.transformer.TwoWayAttentionBlock  | TwoWayAttentionBlock           |
| segment_anything.modeling.transformer.TwoWayTransformer     | TwoWayTransformer              |
| sam2.modeling.sam.transformer.Attention / TwoWay*           | Sam2Attention / Sam2TwoWay*    |
| flamingo_pytorch.flamingo_pytorch.PerceiverAttention        | PerceiverAttention             |
| flamingo_pytorch.flamingo_pytorch.PerceiverResampler        | PerceiverResampler             |
| open_flamingo.src.helpers.PerceiverAttention                | PerceiverAttention             |
| open_flamingo.src.helpers.PerceiverResampler                | OpenFlamingoPerceiverResampler |
| transformers' Owlv2ClassPredictionHead / OwlViTClassPredictionHead | OwlClassHead             |
| transformers.models.llava.modeling_llava.LlavaMultiModalProjector | LlavaProjector            |

Upstream classes are recognised by module path and class name, so none of those packages is imported here.
A swap re-classes the instance (`module.__class__ = drop_in`): every drop-in subclasses mmfast's reference
module, which has upstream's attribute names and submodule layout, so the instance keeps its Parameter
objects (optimizers, DDP/FSDP and weight tying keep working), buffers, device, dtype, train/eval mode and
hooks. Before swapping, patch checks that the instance has what the drop-in's forward reads. The SAM drop-ins
read their attentions' Linear and LayerNorm parameters directly (the fused path never calls those submodules),
so a block or transformer whose such submodule is not the plain torch class or carries hooks (a LoRA-wrapped
projection, a hooked attention) is left alone, with the reason: swapping it would silently skip them.
`unpatch(model)` puts the original classes back.

`patch_open_clip()` replaces open_clip's ClipLoss and SigLipLoss where open_clip's code looks them up
(open_clip.loss, open_clip.factory for create_loss, the package's re-export), so an unmodified open_clip
training script (open_clip_train.main, which calls create_loss) gets mmfast's losses; `unpatch_open_clip()`
reverses it. open_clip's own subclasses (CoCaLoss, DistillClipLoss) keep their upstream base.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from torch import nn

from mmfast import backend as _backend
from mmfast import nn as _mmnn

_SAM_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
_SAM_ATTENTION_ATTRS = ("num_heads", "internal_dim") + _SAM_ATTENTION_LINEARS
_SAM_BLOCK_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
_SAM_BLOCK_NORMS = ("norm1", "norm2", "norm3", "norm4")
_PERCEIVER_ATTENTION_ATTRS = ("heads", "scale", "norm_media", "norm_latents", "to_q", "to_kv", "to_out")
_OWL_HEAD_LINEARS = ("dense0", "logit_shift", "logit_scale")


@dataclass(frozen=True)
class _Swap:
    """One upstream class and its drop-in. `reads` are the attributes the drop-in's forward uses;
    `bypassed_layers` (Linear/LayerNorm) and `bypassed_attentions` are submodules whose parameters it reads
    without calling them."""
    package: str
    module: str
    name: str
    drop_in: type
    reads: tuple[str, ...]
    bypassed_layers: tuple[str, ...] = ()
    bypassed_attentions: tuple[str, ...] = ()

    @property
    def upstream(self) -> str:
        return f"{self.module}.{self.name}"


def _sam_swaps(package: str, module: str, attention: type, block: type, transformer: type) -> list[_Swap]:
    """The three two-way-transformer swaps of segment_anything or SAM2 (same layout, same checks)."""
    return [
        _Swap(package, module, "Attention", attention, _SAM_ATTENTION_ATTRS, bypassed_layers=_SAM_ATTENTION_LINEARS),
        _Swap(package, module, "TwoWayAttentionBlock", block,
              _SAM_BLOCK_ATTENTIONS + _SAM_BLOCK_NORMS + ("mlp", "skip_first_layer_pe"),
              bypassed_layers=_SAM_BLOCK_NORMS, bypassed_attentions=_SAM_BLOCK_ATTENTIONS),
        _Swap(package, module, "TwoWayTransformer", transformer,
              ("layers", "final_attn_token_to_image", "norm_final_attn"),
              bypassed_layers=("norm_final_attn",), bypassed_attentions=("final_attn_token_to_image",)),
    ]


_SWAPS: tuple[_Swap, ...] = (
    *_sam_swaps("segment_anything", "segment_anything.modeling.transformer", _mmnn.SamAttention,
                _mmnn.TwoWayAttentionBlock, _mmnn.TwoWayTransformer),
    *_sam_swaps("sam2", "sam2.modeling.sam.transformer", _mmnn.Sam2Attention, _mmnn.Sam2TwoWayAttentionBlock,
                _mmnn.Sam2TwoWayTransformer),
    _Swap("flamingo_pytorch", "flamingo_pytorch.flamingo_pytorch", "PerceiverAttention", _mmnn.PerceiverAttention,
          _PERCEIVER_ATTENTION_ATTRS),
    _Swap("flamingo_pytorch", "flamingo_pytorch.flamingo_pytorch", "PerceiverResampler", _mmnn.PerceiverResampler,
          ("latents", "media_pos_emb", "layers", "norm")),
    _Swap("open_flamingo", "open_flamingo.src.helpers", "PerceiverAttention", _mmnn.PerceiverAttention,
          _PERCEIVER_ATTENTION_ATTRS),
    _Swap("open_flamingo", "open_flamingo.src.helpers", "PerceiverResampler", _mmnn.OpenFlamingoPerceiverResampler,
          ("latents", "frame_embs", "media_time_embs", "layers", "norm")),
    _Swap("transformers", "transformers.models.llava.modeling_llava", "LlavaMultiModalProjector", _mmnn.LlavaProjector,
          ("linear_1", "act", "linear_2")),
    *(_Swap("transformers", f"transformers.models.{family}.modeling_{family}", name, _mmnn.OwlClassHead,
            _OWL_HEAD_LINEARS + ("elu", "query_dim"), bypassed_layers=_OWL_HEAD_LINEARS)
      for family, name in (("owlv2", "Owlv2ClassPredictionHead"), ("owlvit", "OwlViTClassPredictionHead"))),
)
_BY_UPSTREAM = {(s.module, s.name): s for s in _SWAPS}
_SAM_ATTENTION_SWAPS = {s.drop_in for s in _SWAPS if s.name == "Attention"}
# `only` accepts drop-in class names and package names.
ONLY_NAMES = tuple(sorted({s.drop_in.__name__ for s in _SWAPS} | {s.package for s in _SWAPS}))


# ---- per-instance backend ----------------------------------------------------------------------------
class _PatchState(NamedTuple):
    """Kept in a patched module's __dict__: the class to restore and the backend it runs (None: the one in force)."""
    original_class: type
    backend: str | None


_STATE = "_mmfast_patch"


class _BackendMixin:
    """Runs the drop-in's forward under the backend given to patch() (the drop-ins read the backend in force)."""

    def forward(self, *args, **kwargs):
        with _backend.use_backend(self.__dict__[_STATE].backend):
            return super().forward(*args, **kwargs)


def _make_backend_class(drop_in: type) -> type:
    name = f"{drop_in.__name__}WithBackend"
    # Module-level and named, so a patched model pickles and deep-copies like any other.
    cls = type(name, (_BackendMixin, drop_in), {"__module__": __name__, "__qualname__": name,
                                                 "__doc__": f"{drop_in.__name__} under a per-instance backend."})
    globals()[name] = cls
    return cls


_WITH_BACKEND = {drop_in: _make_backend_class(drop_in) for drop_in in dict.fromkeys(s.drop_in for s in _SWAPS)}


# ---- the report ------------------------------------------------------------------------------------------
class Replaced(NamedTuple):
    name: str          # qualified name in the model ('' for the model itself)
    upstream: str      # module path + class name
    drop_in: str       # mmfast.nn class name
    note: str = ""


class LeftAlone(NamedTuple):
    name: str
    upstream: str
    reason: str


@dataclass
class PatchReport:
    """What patch() replaced and which upstream (or upstream-derived) modules it left alone, with why."""
    replaced: list[Replaced] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.replaced or self.left_alone)

    def __str__(self) -> str:
        if not self:
            return "mmfast.patch: no module mmfast has a drop-in for"
        lines = [f"mmfast.patch: replaced {len(self.replaced)}, left {len(self.left_alone)} alone"]
        lines += [f"  replaced   {r.name or '<model>'}: {r.upstream} -> mmfast.nn.{r.drop_in}"
                  + (f" ({r.note})" if r.note else "") for r in self.replaced]
        lines += [f"  left alone {a.name or '<model>'}: {a.upstream}: {a.reason}" for a in self.left_alone]
        return "\n".join(lines)


# ---- patch / unpatch ---------------------------------------------------------------------------------------
def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _swap_of(cls: type) -> _Swap | None:
    return _BY_UPSTREAM.get((cls.__module__, cls.__qualname__))


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _bypass_problem(parent: nn.Module, child_name: str, *, attention: bool) -> str | None:
    """Why the drop-in may not read `child_name`'s parameters without calling it (None: it may)."""
    child = getattr(parent, child_name)
    state = child.__dict__.get(_STATE)
    cls = state.original_class if state is not None else type(child)
    if attention:
        swap = _swap_of(cls)
        if swap is None or swap.drop_in not in _SAM_ATTENTION_SWAPS:
            return f"its {child_name} is a {_class_name(type(child))}, not upstream's Attention"
        if _hooks(child):
            return f"its {child_name} has hooks, which the fused forward (reading its weights) would skip"
        if "forward" in child.__dict__:
            return f"its {child_name}'s forward is replaced on the instance; the fused forward would skip it"
        problems = (_bypass_problem(child, name, attention=False) for name in _SAM_ATTENTION_LINEARS)
        problem = next((p for p in problems if p), None)
        return f"{child_name}: {problem}" if problem else None
    if type(child) not in (nn.Linear, nn.LayerNorm):
        return (f"its {child_name} is a {_class_name(type(child))}, not a plain Linear/LayerNorm; the fused forward "
                "reads its weights and would skip its forward")
    if _hooks(child):
        return f"its {child_name} has hooks, which the fused forward (reading its weights) would skip"
    return None


def _swap_problem(module: nn.Module, swap: _Swap) -> str | None:
    """Why `module` (an instance of swap's upstream class) cannot take the drop-in's forward (None: it can)."""
    missing = [name for name in swap.reads if not hasattr(module, name)]
    if missing:
        return f"has no {', '.join(missing)} (an upstream version mmfast does not mirror?)"
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance (e.g. by accelerate), which would bypass the drop-in"
    problems = [_bypass_problem(module, name, attention=False) for name in swap.bypassed_layers]
    problems += [_bypass_problem(module, name, attention=True) for name in swap.bypassed_attentions]
    return next((p for p in problems if p), None)


def _check_only(only) -> set[str] | None:
    if only is None:
        return None
    names = {only} if isinstance(only, str) else set(only)
    unknown = sorted(repr(n) for n in names if not (isinstance(n, str) and n in ONLY_NAMES))
    if unknown:
        raise ValueError(f"mmfast.patch: only= has unknown names {', '.join(unknown)}; expected mmfast.nn drop-in "
                         f"class names or package names from {list(ONLY_NAMES)}")
    return names


def _check_model(model, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"mmfast.{caller}: model must be a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, *, backend: str | None = None, only: Iterable[str] | str | None = None) -> PatchReport:
    """Swap in place every module of `model` (the model itself included) that mmfast has a drop-in for.

    backend: the mmfast backend the patched modules run (None: the one in force at each call, see
    mmfast.set_backend / use_backend). only: drop-in class names (e.g. "TwoWayTransformer", "SamAttention")
    and/or package names ("segment_anything", "sam2", "flamingo_pytorch", "open_flamingo") to restrict
    the swap to. Returns a PatchReport; an empty one when nothing in `model` is an upstream module."""
    _check_model(model, "patch")
    if backend is not None:
        _backend._check_name(backend)
    names = _check_only(only)
    report = PatchReport()
    swaps = []
    for qualname, module in model.named_modules(remove_duplicate=True):
        cls = type(module)
        if _STATE in module.__dict__:
            report.left_alone.append(LeftAlone(qualname, _class_name(module.__dict__[_STATE].original_class),
                                               "already patched (mmfast.unpatch it first to change the backend)"))
            continue
        swap = _swap_of(cls)
        if swap is None:
            base = next((b for b in cls.__mro__[1:] if _swap_of(b) is not None), None)
            if base is not None:
                report.left_alone.append(LeftAlone(qualname, _class_name(cls), (
                    f"a subclass of {_class_name(base)} that mmfast has no drop-in for (its forward may differ)")))
            continue
        if names is not None and swap.drop_in.__name__ not in names and swap.package not in names:
            report.left_alone.append(LeftAlone(qualname, swap.upstream, "not selected by only="))
            continue
        problem = _swap_problem(module, swap)
        if problem:
            report.left_alone.append(LeftAlone(qualname, swap.upstream, problem))
            continue
        swaps.append((qualname, module, swap))
    # Checked first and swapped after, so that every check saw the model as the caller built it.
    for qualname, module, swap in swaps:
        module.__dict__[_STATE] = _PatchState(type(module), backend)
        module.__class__ = swap.drop_in if backend is None else _WITH_BACKEND[swap.drop_in]
        note = ""
        if getattr(module, "dropout_p", 0.0) > 0.0:
            note = f"dropout {module.dropout_p}: while training it runs upstream's math, the fused path has no dropout"
        report.replaced.append(Replaced(qualname, swap.upstream, swap.drop_in.__name__, note))
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Restore the upstream class of every module patch() swapped in `model`; returns their qualified names."""
    _check_model(model, "unpatch")
    restored = []
    for qualname, module in model.named_modules(remove_duplicate=True):
        state = module.__dict__.pop(_STATE, None)
        if state is not None:
            module.__class__ = state.original_class
            restored.append(qualname)
    return restored


# ---- open_clip (class-level) -------------------------------------------------------------------------------
# Where open_clip 3.3.0 looks the two losses up: its loss module, factory.create_loss's globals, and the
# package's re-exports (only ClipLoss is re-exported there).
_OPEN_CLIP_SITES = (("open_clip.loss", "ClipLoss"), ("open_clip.loss", "SigLipLoss"),
                    ("open_clip.factory", "ClipLoss"), ("open_clip.factory", "SigLipLoss"),
                    ("open_clip", "ClipLoss"), ("open_clip", "SigLipLoss"))
_open_clip_originals: dict[tuple[str, str], type] = {}


def patch_open_clip() -> list[str]:
    """Make open_clip build mmfast's ClipLoss / SigLipLoss: `open_clip.create_loss(args)`,
    `open_clip.loss.ClipLoss(...)` and `open_clip.loss.SigLipLoss(...)` then return mmfast.nn's modules (same
    constructors, forward and outputs). Returns the patched names ("module.attribute"). Idempotent; raises
    ImportError naming the package when open_clip is not installed."""
    try:
        importlib.import_module("open_clip")
    except ImportError as e:
        raise ImportError(f"mmfast.patch_open_clip: open_clip is not installed ({e}); "
                          "pip install open-clip-torch") from e
    replacements = {"ClipLoss": _mmnn.ClipLoss, "SigLipLoss": _mmnn.SigLipLoss}
    patched = []
    for module_name, attr in _OPEN_CLIP_SITES:
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            continue
        if (module_name, attr) not in _open_clip_originals:
            _open_clip_originals[(module_name, attr)] = getattr(module, attr)
        setattr(module, attr, replacements[attr])
        patched.append(f"{module_name}.{attr}")
    return patched


def unpatch_open_clip() -> list[str]:
    """Put back open_clip's own ClipLoss / SigLipLoss; returns the restored names (empty if nothing was patched)."""
    restored = []
    for (module_name, attr), original in _open_clip_originals.items():
        setattr(sys.modules[module_name], attr, original)
        restored.append(f"{module_name}.{attr}")
    _open_clip_originals.clear()
    return restored


__all__ = ["patch", "unpatch", "patch_open_clip", "unpatch_open_clip", "PatchReport", "Replaced", "LeftAlone",
           "ONLY_NAMES"]
