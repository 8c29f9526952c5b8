"""Temporal action detection with quantized adapters (chapter 02): a small, honest stand-in for AdaTAD.

THUMOS14 and VideoMAE weights cannot be had offline, so this package builds every piece small enough for a
CPU and keeps the real shapes for the GPU benchmark: ``data`` (synthetic untrimmed videos of real images,
THUMOS-style annotations), ``evaluate`` (1D NMS, THUMOS-protocol mAP; numpy only), ``model`` (a VideoMAE-style
ViT and an ActionFormer-style head), ``adapters`` (AdaTAD's and the seed's adapters, a 4-bit backbone),
``config`` (configs in OpenTAD's shape and the builder), ``train`` (pre-training, training with resume, costs)
and ``claims`` (the seeds' numbers against what is counted and measured). This file imports nothing.
"""
