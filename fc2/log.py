"""fc2's log lines inside an engine: the ``fc2`` logger writes through the engine's handlers.

Every fc2 module logs to a child of the ``fc2`` logger (``logging.getLogger(__name__)``). Python
sends those records to the root logger, which an engine such as vLLM leaves without handlers (vLLM
configures its own ``vllm`` logger with ``propagate=False``): a user would never see what FlashComm2
did. `attach_to_engine` gives the ``fc2`` logger the engine logger's handlers and level, so fc2's
lines appear in the engine's output, formatted like the engine's own. It is idempotent, and does
nothing when the engine logger has no handlers (logging configured by the application: the records
then propagate to the root logger as usual).
"""

from __future__ import annotations

import logging

#: The logger every fc2 module logs under.
FC2_LOGGER = "fc2"


def attach_to_engine(engine_logger: str = "vllm") -> bool:
    """Route the ``fc2`` logger through ``engine_logger``'s handlers; True if it did."""
    source = logging.getLogger(engine_logger)
    if not source.handlers:
        return False
    target = logging.getLogger(FC2_LOGGER)
    for handler in source.handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
    target.setLevel(source.getEffectiveLevel())
    target.propagate = False
    return True
