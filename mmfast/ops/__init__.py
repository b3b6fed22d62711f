"""Functional API: argument checks, backend choice, autograd and fake impls, one file per op."""
from mmfast.ops.cross_attention import cross_attention
from mmfast.ops.similarity_softmax import similarity_softmax

__all__ = ["cross_attention", "similarity_softmax"]
