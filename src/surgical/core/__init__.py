"""The bottom layer: what Plan, Delta, training and every recipe stand on.

Errors, registries with declared options, atomic IO, the sparse support shared by plans and
deltas (kinds, block helpers, the index and value codecs), layer-name parsing and name
patterns, the model-loss helper, the marks surgical leaves on a model, and the base-model
fingerprint. Nothing here imports any other surgical package.
"""

from surgical.core.runtime import quiet_optional_imports

# the first code of surgical that runs, before anything imports transformers (and with it torchao)
quiet_optional_imports()
