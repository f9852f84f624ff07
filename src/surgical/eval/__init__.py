"""Evaluation: accuracy now; OOD and forgetting metrics build on it."""

from surgical.eval.accuracy import predict

__all__ = ["predict"]
