"""Compression: int8 quantization, knowledge distillation and pruning (docs/compression.md)."""
