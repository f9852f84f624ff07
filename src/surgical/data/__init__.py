"""Data loading and batching; example, token and online-batch selection."""

from surgical.data.criteria import DATA_CRITERIA, DataContext
from surgical.data.examples import as_examples, batches_of, collate, data_hash, split_batches
from surgical.data.instruct import instruction_batches, load_instructions
from surgical.data.lazy import LazyBatches, lazy_chat_batches, lazy_instruction_batches
from surgical.data.online import OnlineSelector
from surgical.data.select_data import DataSelection, select_data
from surgical.data.table import load_table
from surgical.data.text import TextExamples, text_batches
from surgical.data.tokens import TOKEN_CRITERIA, ReferenceLosses, token_mask, token_report

__all__ = [
    "DATA_CRITERIA",
    "TOKEN_CRITERIA",
    "DataContext",
    "DataSelection",
    "LazyBatches",
    "OnlineSelector",
    "ReferenceLosses",
    "TextExamples",
    "as_examples",
    "batches_of",
    "collate",
    "data_hash",
    "instruction_batches",
    "lazy_chat_batches",
    "lazy_instruction_batches",
    "load_instructions",
    "load_table",
    "select_data",
    "split_batches",
    "text_batches",
    "token_mask",
    "token_report",
]
