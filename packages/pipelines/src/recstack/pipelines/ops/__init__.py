"""Fused dense-side ops with autograd: losses over large vocabularies, attention over
jagged sequences and DIN's Dice activation. Each op runs its Triton kernels on CUDA and
its torch reference on the CPU."""

from recstack.pipelines.ops.cross_entropy import (
    LOGITS_BLOCK_BYTES,
    LinearCrossEntropy,
    in_batch_softmax_loss,
    linear_cross_entropy,
    logits_chunk_rows,
    sampled_softmax_loss,
)
from recstack.pipelines.ops.dice import dice
from recstack.pipelines.ops.jagged_attention import JaggedSelfAttention, jagged_attention
from recstack.pipelines.ops.target_attention import (
    FusedTargetAttention,
    padded_target_attention,
    target_attention,
)

__all__ = [
    "LOGITS_BLOCK_BYTES",
    "FusedTargetAttention",
    "JaggedSelfAttention",
    "LinearCrossEntropy",
    "dice",
    "in_batch_softmax_loss",
    "jagged_attention",
    "linear_cross_entropy",
    "logits_chunk_rows",
    "padded_target_attention",
    "sampled_softmax_loss",
    "target_attention",
]
