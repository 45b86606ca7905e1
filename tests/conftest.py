"""Shared fixtures: offline mode, the data directory, tiny random models, the real Gemma.

vLLM engine fixtures live with the tests that need them (one engine at a time on
this 2-core machine); this file only provides model directories.
"""

import os
from pathlib import Path

# Before anything imports huggingface_hub: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

import tiny_models
from lingosteer import DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data directory (`LINGOSTEER_DATA_DIR` overrides the default)."""
    path = Path(os.environ.get("LINGOSTEER_DATA_DIR", DEFAULT_DATA_DIR))
    if not path.is_dir():
        pytest.fail(f"data directory {path} not found (set LINGOSTEER_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(request, tmp_path_factory, data_dir):
    """Factory: `tiny_model_dir(arch, dtype="float32") -> Path`, arch one of `tiny_models.ARCHITECTURES`.

    Builds live in pytest's cache directory keyed by their parameters, so a rerun
    reuses them; a fresh clone (CI) builds each in a few seconds. Without the cache
    plugin (`-p no:cacheprovider`) they go to a session temporary directory.
    """
    cache = getattr(request.config, "cache", None)
    cache_root = Path(cache.mkdir("lingosteer-tiny-models")) if cache else tmp_path_factory.mktemp("tiny-models")

    def get(arch: str = "llama", dtype: str = "float32") -> Path:
        return tiny_models.cached_tiny_model(arch, cache_root, dtype=dtype, data_dir=data_dir)

    return get


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> Path:
    """The tiny random Llama most engine tests run on."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def gemma_model_dir() -> Path:
    """The real Gemma 3 270M, prepared into the default model cache (slow once, then instant)."""
    from lingosteer.models import prepare_model

    return prepare_model("gemma-3-270m")
