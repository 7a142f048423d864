"""Grokking tasks (modular arithmetic, 8x8 digits) and the reference models of the papers."""

from .digits import DigitsData, load_digits_task
from .models import DecoderTransformer, EmbeddingMLP, OmnigrokMLP
from .modular import (
    MODULAR_TASKS,
    ModularData,
    ModularSplit,
    canonical_task,
    grokfast_split,
    modular_dataset,
    neuralgrok_split,
)

__all__ = [
    "MODULAR_TASKS",
    "DecoderTransformer",
    "DigitsData",
    "EmbeddingMLP",
    "ModularData",
    "ModularSplit",
    "OmnigrokMLP",
    "canonical_task",
    "grokfast_split",
    "load_digits_task",
    "modular_dataset",
    "neuralgrok_split",
]
