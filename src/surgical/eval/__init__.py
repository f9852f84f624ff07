"""Evaluation: task metrics on named sets, forgetting against the base, reports.

- :func:`evaluate`: accuracy and loss (classification); token loss, perplexity and answer
  accuracy (causal LMs), per named set (ID, OOD, ...);
- :func:`forgetting`: reference loss change and KL(base || tuned), from one model by toggling a
  delta, or from two models;
- :func:`write_report` / :func:`print_table`: ``report.json``, a ``report.png`` scatter (ID vs OOD,
  or task score vs forgetting) and a console table;
- :func:`predict`: a classifier's logits, predictions and accuracy.
"""

from surgical.eval.accuracy import predict
from surgical.eval.forgetting import forgetting
from surgical.eval.metrics import evaluate
from surgical.eval.report import print_table, write_report

__all__ = ["evaluate", "forgetting", "predict", "print_table", "write_report"]
