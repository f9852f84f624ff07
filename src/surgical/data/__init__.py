"""Data loading and batching."""

from surgical.data.text import TextExamples, load_table, text_batches

__all__ = ["TextExamples", "load_table", "text_batches"]
