"""lingosteer: cross-lingual alignment applied at serving time, guided by interference data."""

import os
from pathlib import Path

# vLLM logs to stdout unless told otherwise; every lingosteer command and benchmark keeps
# stdout for its result (exactly one JSON object with --json), so vLLM's lines go to stderr.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

__version__ = "0.1.0"

# The repository root holds configs/; the package is installed editable from it.
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
