"""Tiny random models for tests, built at test time: Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text) and Phi-3, the architectures lingosteer steers, and GPT-2, one it refuses.

Each model is a normal Hugging Face directory (config.json, model.safetensors,
generation_config.json, PreTrainedTokenizerFast files) that both transformers and
vLLM load. The tokenizer is a small byte-level BPE trained here on SIB-200
(FLORES-200) sentences of a few languages, so multilingual text tokenizes sensibly,
and its post-processor adds <bos> like the real Gemma tokenizer after conversion.

Everything is deterministic (fixed seeds, sorted inputs): the same parameters give
byte-identical files. `cached_tiny_model` keys a build directory by a hash of the
parameters and of this file's source, so reruns reuse what an earlier run built and
any change here invalidates it.

Special token ids follow Gemma: <pad>=0, <eos>=1, <bos>=2, <unk>=3.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from lingosteer import DEFAULT_DATA_DIR

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")  # the steerable ones
UNSTEERABLE_ARCHITECTURES = ("gpt2",)  # vLLM serves it, lingosteer refuses it (its layers return one tensor)
# The class transformers and vLLM both name each one (vLLM's class is what the plugin reports).
ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel",
}
TOKENIZER_LANGUAGES = ("eng_Latn", "swh_Latn", "ita_Latn", "zho_Hans")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
DEFAULT_VOCAB_SIZE = 2048

# Sizes shared by all (GPT-2 names them its own way): 4 heads of 32 (the smallest head size vLLM's CPU
# attention supports), grouped-query attention, short context.
_COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)


# Gemma 2 and 3: sliding-window and global layers alternating, Gemma's query scaling, tied embeddings.
_GEMMA_LAYERS = dict(
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    sliding_window=64,
    query_pre_attn_scalar=_COMMON["head_dim"],
    tie_word_embeddings=True,
)


def _config(arch: str, vocab_size: int):
    """The transformers config of one tiny architecture (layer counts differ on purpose)."""
    from transformers import (
        Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config,
    )

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, num_hidden_layers=2, tie_word_embeddings=False, **_COMMON)
    if arch == "mistral":
        # Mistral 7B v0.1's 4096-token sliding window (transformers' default), longer than any test prompt.
        # 3 layers: with Llama's 2 the same seed gave Llama's weights, so the same numbers.
        return MistralConfig(vocab_size=vocab_size, num_hidden_layers=3, tie_word_embeddings=False, **_COMMON)
    if arch == "qwen2":
        # Qwen2 has biases on q/k/v, which a residual-stream hook must not care about.
        return Qwen2Config(vocab_size=vocab_size, num_hidden_layers=3, tie_word_embeddings=True, **_COMMON)
    if arch == "qwen3":
        # Qwen3 norms q and k per head (q_norm / k_norm) and has no q/k/v biases.
        return Qwen3Config(vocab_size=vocab_size, num_hidden_layers=3, tie_word_embeddings=True, **_COMMON)
    if arch == "gemma2":
        # Gemma 2: post-attention and post-feedforward norms, logit soft-capping, sliding and global layers
        # alternating (a short window, as for Gemma 3 below).
        return Gemma2Config(vocab_size=vocab_size, **_GEMMA_LAYERS, **_COMMON)
    if arch == "phi3":
        # Phi-3 packs q/k/v into one qkv_proj and gate/up into one gate_up_proj; its config has no head_dim
        # (hidden_size / num_attention_heads = 32 all the same).
        common = {key: value for key, value in _COMMON.items() if key != "head_dim"}
        return Phi3Config(vocab_size=vocab_size, num_hidden_layers=2, tie_word_embeddings=False, **common)
    if arch == "gpt2":
        # The refusal tests' model: LayerNorm with biases, learned positions, layers that return one tensor.
        return GPT2Config(
            vocab_size=vocab_size, n_embd=_COMMON["hidden_size"], n_inner=_COMMON["intermediate_size"], n_layer=2,
            n_head=_COMMON["num_attention_heads"], n_positions=_COMMON["max_position_embeddings"],
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        )
    if arch == "gemma3":
        # Gemma 3 mixes sliding-window and global layers; a short window makes the
        # sliding layers behave differently from global ones on ordinary prompts.
        return Gemma3TextConfig(vocab_size=vocab_size, **_GEMMA_LAYERS, **{**_COMMON, "num_key_value_heads": 1})
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {list(ARCHITECTURE_CLASSES)}")


def read_sib200_sentences(data_dir: Path, languages: tuple[str, ...]) -> list[str]:
    """All SIB-200 sentences (train, dev, test) of the given languages, in a fixed order."""
    sentences = []
    for language in languages:
        for split in ("train", "dev", "test"):
            path = Path(data_dir) / "sib200" / language / f"{split}.tsv"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: tiny test tokenizers train on SIB-200 data")
            with path.open(encoding="utf-8", newline="") as f:
                rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                sentences.extend(row["text"] for row in sorted(rows, key=lambda r: int(r["index_id"])))
    return sentences


def train_tokenizer(sentences: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE `PreTrainedTokenizerFast` whose encoding starts with <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def build_tiny_model(
    arch: str,
    out_dir: Path,
    *,
    dtype: str = "float32",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    data_dir: Path = DEFAULT_DATA_DIR,
) -> Path:
    """Train the tokenizer, build a random `arch` model and save both into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = train_tokenizer(read_sib200_sentences(data_dir, TOKENIZER_LANGUAGES), vocab_size)
    config = _config(arch, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cached_tiny_model(arch: str, cache_root: Path, **params) -> Path:
    """`build_tiny_model` into `cache_root/<arch>-<hash>`, reusing an earlier identical build.

    The build goes to a temporary sibling first and is renamed into place, so an
    interrupted build never leaves a half-written directory that a later run would trust.
    """
    if arch not in ARCHITECTURE_CLASSES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {list(ARCHITECTURE_CLASSES)}")
    key_source = json.dumps({"arch": arch, **{k: str(v) for k, v in params.items()}}, sort_keys=True)
    key = hashlib.sha256(key_source.encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    cache_root = Path(cache_root)
    target = cache_root / f"{arch}-{params.get('dtype', 'float32')}-{key}"
    if (target / "config.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
    try:
        build_tiny_model(arch, staging, **params)
        staging.rename(target)
    except OSError:
        # Another process finished the same build first: its copy is identical.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
