"""Functional API: argument checks, backend choice, autograd and fake impls, one file per op."""
from mmfast.ops.similarity_softmax import similarity_softmax

__all__ = ["similarity_softmax"]
