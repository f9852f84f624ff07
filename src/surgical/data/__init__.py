"""Data loading and batching."""

from surgical.data.instruct import instruction_batches, load_instructions
from surgical.data.table import load_table
from surgical.data.text import TextExamples, text_batches

__all__ = ["TextExamples", "instruction_batches", "load_instructions", "load_table", "text_batches"]
