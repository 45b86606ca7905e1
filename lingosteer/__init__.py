"""lingosteer: cross-lingual alignment applied at serving time, guided by interference data."""

import os
from pathlib import Path

# vLLM logs to stdout unless told otherwise; every lingosteer command and benchmark keeps
# stdout for its result (exactly one JSON object with --json), so vLLM's lines go to stderr.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

__version__ = "0.1.0"

# In a checkout (an editable install), the repository root; the shared data lies beside it
# unless LINGOSTEER_DATA_DIR says where it is (as it must after `pip install .`).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path(os.environ.get("LINGOSTEER_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def config_path(*parts: str) -> Path:
    """A file or folder of the project's configs/ (`config_path("bench", "groups.yaml")`).

    configs/ is package data (lingosteer/configs links to the repository's configs/), so the
    same path is found in a checkout and after `pip install .`, from any working directory.
    """
    return Path(__file__).parent.joinpath("configs", *parts)
