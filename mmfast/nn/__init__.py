"""Drop-in torch.nn modules whose constructors, forward signatures and state_dict keys match upstream."""
from mmfast.nn.contrastive_loss import ClipLoss, SigLipLoss
from mmfast.nn.llava import LlavaProjector
from mmfast.nn.owl import OwlClassHead
from mmfast.nn.perceiver import OpenFlamingoPerceiverResampler, PerceiverAttention, PerceiverResampler
from mmfast.nn.sam_attention import (Sam2Attention, Sam2TwoWayAttentionBlock, Sam2TwoWayTransformer, SamAttention,
                                     TwoWayAttentionBlock, TwoWayTransformer)
from mmfast.nn.similarity_softmax import SimilaritySoftmax, ZeroShotClassifier

__all__ = ["SimilaritySoftmax", "ZeroShotClassifier", "ClipLoss", "SigLipLoss", "PerceiverAttention", "PerceiverResampler",
           "OpenFlamingoPerceiverResampler", "SamAttention", "TwoWayAttentionBlock", "TwoWayTransformer",
           "Sam2Attention", "Sam2TwoWayAttentionBlock", "Sam2TwoWayTransformer", "LlavaProjector", "OwlClassHead"]
