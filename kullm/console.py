"""What a user sees: third-party messages that say nothing actionable are filtered, and kullm's and Lightning's own
lines also reach the run's log file."""

from __future__ import annotations

import logging
import re
import warnings

# (logger, message pattern): log records dropped where they are made
NOISY_LOGS = (
    # bitsandbytes on CPU looks for an optional hub kernel package on import
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # ... through the `kernels` package, which says it cannot check the kernel's publisher while offline
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/"),
    # DeepSpeed announces the accelerator it detected on import ("Setting accelerator to CPU" without a GPU)
    ("DeepSpeed", r"Setting (ds_)?accelerator to"),
    # Lightning advertises a logging service
    ("lightning.pytorch.utilities.rank_zero", r"Tip: For seamless cloud logging"),
)
# Python warnings dropped (message patterns)
NOISY_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated",  # transformers 5 renamed it; PEFT still asks
    r"`torch\.utils\._pytree\._register_pytree_node` is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch 2.13 deprecates what Lightning's _pytree uses
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    """Filter the known non-actionable warnings and log lines (idempotent); ``httpx`` logs no line per request."""
    for name, pattern in NOISY_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("httpx", "httpcore"):  # "HTTP Request: POST <url>" for every judge request: URL credentials too
        logging.getLogger(name).setLevel(logging.WARNING)


def mirror_to_run_log() -> None:
    """Send Lightning's lines (and kullm's, printed through Lightning's rank-zero logger) to the log file(s) Hydra
    opened for this run too; Lightning's logger does not propagate to the root logger Hydra configures."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    lightning = logging.getLogger("lightning.pytorch")
    for handler in files:
        if handler not in lightning.handlers:
            lightning.addHandler(handler)
