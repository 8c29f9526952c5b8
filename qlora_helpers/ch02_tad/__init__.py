"""Temporal action detection with quantized adapters (chapter 02): a small, honest stand-in for AdaTAD.

THUMOS14 and VideoMAE weights cannot be had offline, so this package builds every piece small enough
for a CPU and keeps the real shapes for the GPU benchmark:

==========  ==========================================================================================
module      what it holds
==========  ==========================================================================================
data        synthetic untrimmed videos made of real offline images, THUMOS-style annotation JSON
evaluate    1D NMS and THUMOS-protocol mAP at tIoU 0.3..0.7 (numpy only)
vit         a VideoMAE-style ViT: tubelet embedding, 16-frame attention chunks, optional checkpointing
adapters    the AdaTAD temporal adapter and its plain variant, the seed's QLoRA adapter, 4-bit backbone
head        an ActionFormer-style pyramid head: focal classification loss, DIoU regression loss
config      configs in OpenTAD's shape, their validation, the model builder and paramwise optimizer groups
train       pre-training (cached), training with atomic checkpoints and resume, evaluation, costs
claims      the seeds' parameter and memory numbers next to what is counted and measured, with verdicts;
            the GPU memory table and figure of ``benchmarks/tad_memory.py``; the learning figures the
            tests assert on (mAP@0.5 over chance and over a random backbone) and the 1 % mAP verdict
==========  ==========================================================================================

This package itself and ``evaluate`` import numpy at most; the other modules import torch, and
bitsandbytes only inside the function that builds quantized layers (``adapters.bnb_module``).
"""
