"""Trace the whole LoRA training step (forward, loss, backward) into one TrainingGraph.

The step is traced once with `make_fx` over a function that runs the model with
`torch.func.functional_call` and returns the loss and `torch.autograd.grad` of it with
respect to the LoRA parameters. Every weight, buffer and batch tensor is a graph input, so
weights can later be streamed rather than baked in.

Each node is attributed to the module it came from and to its transformer block:
forward ops through module hooks that annotate the trace (`torch.fx.traceback.annotate`),
backward ops through autograd-node pre-hooks that carry over the annotation of the
forward op that created the autograd node (matched by autograd sequence number).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import transformers
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functional_call
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_flatten

from mebp_compiler.ir import InputSpec, Phase, Role, TensorInfo, TrainingGraph, collects_new_objects_only
from mebp_compiler.blocks import NoDecoderBlocksError, block_mlp, decoder_layers
from mebp_compiler.sliced_loss import slice_bounds, sliced_linear_cross_entropy
from mebp_compiler.stamp import block_kinds, stamp, stamp_depth, truncated

#: Largest tensor allowed as a constant inside the graph; anything bigger is a weight
#: that was baked in and could not be streamed.
MAX_CONSTANT_BYTES = 4096


class CaptureError(ValueError):
    """The model or batch cannot be captured; the message says what to change."""


class UnsupportedOpError(CaptureError):
    """An op in the traced step that the pipeline cannot schedule exactly."""

    def __init__(self, op: str, module: str, reason: str, fix: str) -> None:
        where = f"module '{module}'" if module else "the model's top level"
        super().__init__(f"unsupported op {op} in {where}: {reason}. {fix}")
        self.op = op
        self.module = module


@collects_new_objects_only
def capture(
    model: torch.nn.Module,
    example_batch: Mapping[str, torch.Tensor],
    *,
    backward: bool = True,
    head_chunks: int = 0,
    vocab_slices: int = 0,
    mlp_chunks: int = 0,
    by_block: bool = True,
) -> TrainingGraph:
    """Trace one training step of `model` on a batch shaped like `example_batch`.

    `model` is a causal LM whose trainable parameters are the LoRA parameters (e.g. from
    `mebp_compiler.app.models.add_lora`); `example_batch` holds `input_ids` and `labels`,
    int64 tensors of the same [batch, seq] shape, and optionally `attention_mask` of that
    shape (int64 or bool, 0 at padding). Values do not matter, only shapes: the trace runs
    on fake tensors. A mask becomes a batch input of the graph and reaches the model as
    `model(input_ids=..., attention_mask=..., labels=...)` does: transformers builds the
    causal padding mask from it and numbers positions 0..seq-1 whatever the padding (as
    its forward does without `position_ids`). Other batch keys are refused, not dropped.

    With `backward=False` the traced step is the forward and loss only (outputs
    `["loss"]`, no gradients), over the same inputs: what a zeroth-order method such as
    MeZO runs.

    With `head_chunks=k > 0` the vocabulary projection and cross-entropy are computed in
    `k` chunks along the sequence (`chunked_lm_loss`), each chunk tagged as a block of its
    own (numbered after the transformer blocks), so a schedule can recompute one chunk's
    `[chunk x vocab]` logits at a time in the backward instead of holding `[seq x vocab]`.
    The loss is the same mean over non-ignored tokens as transformers' causal-LM loss.

    With `vocab_slices=s > 0` each chunk (the whole sequence when `head_chunks=0`) computes
    its logits and cross-entropy `s` vocabulary slices at a time, forward and backward
    (`sliced_loss`): no `[tokens x vocab]` tensor exists at all, and each slice of the frozen
    head weight is read only for its own matmul.

    With `mlp_chunks=m > 1` every block's MLP runs on `m` chunks of the sequence, one
    after the other (`chunked_mlps`): the MLP acts on each token alone, so the result is
    the same, but its `[seq x intermediate]` products and their gradients exist one
    `[seq/m x intermediate]` chunk at a time - in most models the largest tensors of a
    block's backward.

    With `by_block=True` (the default) a model whose decoder blocks repeat is traced with its
    block stack cut to a few blocks and the rest stamped out from them (`stamp`): the same
    graph as the whole trace, where the traced blocks show that they repeat; otherwise, and
    with `by_block=False`, the whole model is traced.
    """
    if mlp_chunks < 0 or mlp_chunks > example_batch["input_ids"].shape[-1]:
        raise CaptureError(f"mlp_chunks must be between 0 and the sequence length, got {mlp_chunks}")
    if vocab_slices < 0:
        raise CaptureError(f"vocab_slices must be 0 (off) or a positive number of slices, got {vocab_slices}")
    if head_chunks < 0 or head_chunks > example_batch["input_ids"].shape[-1]:
        raise CaptureError(f"head_chunks must be between 0 and the sequence length, got {head_chunks}")
    input_ids, labels, attention_mask = _check_batch(example_batch)
    trace = functools.partial(_trace, model, input_ids, labels, attention_mask, backward=backward,
                              head_chunks=head_chunks, vocab_slices=vocab_slices, mlp_chunks=mlp_chunks)
    if by_block and backward:
        graph = _capture_by_block(model, trace)
        if graph is not None:
            return graph
    return trace()


def _capture_by_block(model: torch.nn.Module, trace: Callable[[], TrainingGraph]) -> TrainingGraph | None:
    """The step traced over the first few blocks and stamped out to all of them, or None where it cannot be."""
    try:
        layers = decoder_layers(model)
    except NoDecoderBlocksError:
        return None
    kinds = block_kinds(model, layers)
    depth = stamp_depth(kinds)
    if depth is None:
        return None
    stack = next(name for name, module in model.named_modules() if module is layers)
    frozen, lora = _step_parameters(model)
    with truncated(layers, depth):
        try:
            traced = trace()
        except CaptureError:
            return None
    batch = [(spec.role, spec.source) for spec in traced.inputs if spec.role == Role.BATCH]
    inputs = [(Role.FROZEN, k) for k in frozen] + [(Role.LORA, k) for k in lora] + batch
    return stamp(traced, stack, kinds, inputs, list(lora))


def _step_parameters(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The step's frozen inputs (frozen parameters, then buffers) and its LoRA parameters, by name."""
    params = dict(model.named_parameters())
    lora = {k: p for k, p in params.items() if p.requires_grad}
    frozen = {k: p for k, p in params.items() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))
    return frozen, lora


def _trace(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    backward: bool,
    head_chunks: int,
    vocab_slices: int,
    mlp_chunks: int,
) -> TrainingGraph:
    """`capture` by one trace of the whole step."""
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise CaptureError(
            "the model has transformers' gradient checkpointing enabled; call "
            "model.gradient_checkpointing_disable() - mebp schedules recomputation itself"
        )
    frozen, lora = _step_parameters(model)
    if not lora:
        raise CaptureError(
            "the model has no trainable parameters: add LoRA adapters first, e.g. "
            "mebp_compiler.app.models.add_lora(model)"
        )
    if head_chunks or vocab_slices:
        _check_chunked_head(model, lora, vocab_slices)
    batch_inputs = {"input_ids": input_ids, "labels": labels}
    if attention_mask is not None:
        batch_inputs["attention_mask"] = attention_mask
    specs = (
        [InputSpec("", Role.FROZEN, k) for k in frozen]
        + [InputSpec("", Role.LORA, k) for k in lora]
        + [InputSpec("", Role.BATCH, k) for k in batch_inputs]
    )
    flat_inputs = [*frozen.values(), *lora.values(), *batch_inputs.values()]
    n_frozen, n_lora = len(frozen), len(lora)
    frozen_names, lora_names, batch_keys = list(frozen), list(lora), list(batch_inputs)

    def step(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = dict(zip(frozen_names, flat[:n_frozen]))
        state.update(zip(lora_names, flat[n_frozen : n_frozen + n_lora]))
        batch = dict(zip(batch_keys, flat[n_frozen + n_lora :]))
        if head_chunks or vocab_slices:
            loss = chunked_lm_loss(model, state, batch["input_ids"], batch["labels"], max(head_chunks, 1),
                                   tracer_state, vocab_slices, batch.get("attention_mask"))
        else:
            loss = functional_call(model, state, (), {**batch, "use_cache": False}).loss
        if loss is None:
            raise CaptureError("the model returned no loss for labels=...: is it a causal LM?")
        if not backward:
            return (loss,)
        annotate_backward(loss)
        lora_inputs = flat[n_frozen : n_frozen + n_lora]
        grads = torch.autograd.grad(loss, lora_inputs, allow_unused=True)
        # A LoRA layer the loss does not reach (a decoder's cross-attention run without an
        # encoder) has gradient zero, as autograd's own accumulation would leave it.
        return (loss, *(torch.zeros_like(p) if g is None else g for p, g in zip(lora_inputs, grads)))

    layers = blocks_of(model)
    tracer_state = _ModuleAnnotator(model, layers)
    annotate_backward = tracer_state.annotate_backward
    # preserve_node_meta outermost: an error inside the trace closes the annotations it holds first.
    with (fx_traceback.preserve_node_meta(), eager_attention(model), tracer_state.installed(),
          chunked_mlps(layers, mlp_chunks, tracer_state.part)):
        try:
            gm = make_fx(step, tracing_mode="fake")(*flat_inputs)
        except CaptureError:
            raise
        except Exception as exc:
            raise tracer_state.trace_error(exc) from exc
    tracer_state.check_block_order()
    replace_intermediate_mutations(gm)
    contiguous_before_uncertain_views(gm)
    if not backward:  # drop unused forward outputs (nll_loss's total weight) the backward would read
        gm.graph.eliminate_dead_code()
        gm.recompile()

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = [InputSpec(p.name, s.role, s.source) for p, s in zip(placeholders, specs, strict=True)]
    outputs = ["loss", *lora_names] if backward else ["loss"]
    info = _tensor_infos(gm, specs)
    return TrainingGraph(
        module=gm,
        info=info,
        inputs=specs,
        outputs=outputs,
        num_blocks=len(layers),
        batch_shape=tuple(input_ids.shape),
        meta={"head_chunks": head_chunks, "vocab_slices": vocab_slices, "mlp_chunks": mlp_chunks},
    )


class AttentionSwitched(UserWarning):
    """The model's attention (or experts) implementation was switched to a traceable one for the trace."""


def _attention_implementations(model: torch.nn.Module) -> set[str]:
    """The attention implementations (`config._attn_implementation`) of every transformers model inside `model`."""
    configs = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), transformers.PretrainedConfig)]
    return {c._attn_implementation for c in configs if getattr(c, "_attn_implementation", None) is not None}


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """While active, `model` computes attention with transformers' eager implementation.

    SDPA (transformers' default) and the fused kernels trace to a fused attention op whose
    backward the capture cannot take apart (and whose decomposed form gave NaN gradients,
    shared/TOOLCHAIN-NOTES.md); eager attention is the same math in plain ATen ops. A switch
    is announced with one `AttentionSwitched` warning; the model's own setting is restored
    on exit. A model that cannot switch at run time is refused (CaptureError).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with _batched_experts(base):
        used = _attention_implementations(base) - {"eager"}
        if not used:
            yield
            return
        with _switched_attention(base, used):
            yield


@contextlib.contextmanager
def _batched_experts(base: torch.nn.Module):
    """While active, a mixture of experts that runs them with `grouped_mm` runs them with `batched_mm`
    (the same products, one batched matmul per token and expert): `grouped_mm` traces only in
    bfloat16 on the CPU. Announced with one AttentionSwitched warning; restored on exit."""
    previous = getattr(getattr(base, "config", None), "_experts_implementation", None)
    if previous != "grouped_mm" or not hasattr(base, "set_experts_implementation"):
        yield
        return
    base.set_experts_implementation("batched_mm")
    warnings.warn(f"{type(base).__name__} runs its experts with 'grouped_mm'; mebp traces them with 'batched_mm' "
                  "(the same products)", AttentionSwitched, stacklevel=5)
    try:
        yield
    finally:
        base.set_experts_implementation(previous)


@contextlib.contextmanager
def _switched_attention(base: torch.nn.Module, used: set[str]):
    """While active, `base` computes attention eagerly (see `eager_attention`)."""
    previous = base.config._attn_implementation
    if not hasattr(base, "set_attn_implementation"):
        raise CaptureError(f"{type(base).__name__} uses attention {sorted(used)}; load it with "
                           "attn_implementation='eager'")
    base.set_attn_implementation("eager")
    if _attention_implementations(base) != {"eager"}:
        base.set_attn_implementation(previous)
        raise CaptureError(f"{type(base).__name__} uses attention {', '.join(sorted(used))} and cannot switch to "
                           "eager at run time; load it with attn_implementation='eager'")
    warnings.warn(f"{type(base).__name__} was loaded with attn_implementation={previous!r}; mebp traces it with "
                  "'eager' attention (the same math; a fused attention's backward cannot be scheduled exactly)",
                  AttentionSwitched, stacklevel=4)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList | torch.nn.Sequential:
    """The model's decoder blocks (`blocks.decoder_layers`); CaptureError, before any tracing, if it has none."""
    try:
        layers = decoder_layers(model)
    except NoDecoderBlocksError as exc:
        raise CaptureError(f"{exc}; mebp checkpoints and schedules a step block by block, so it cannot "
                           "capture a model without one") from None
    first = {}
    for i, layer in enumerate(layers):
        if id(layer) in first:
            name = next(n for n, m in model.named_modules() if m is layers)
            raise CaptureError(f"blocks {first[id(layer)]} and {i} of '{name}' are one module run twice: a "
                               "weight-shared block cannot be checkpointed block by block")
        first[id(layer)] = i
    return layers


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding: token ids and labels must lie in [0, vocab_size)."""
    return model.get_input_embeddings().num_embeddings


@contextlib.contextmanager
def chunked_mlps(layers: torch.nn.ModuleList, chunks: int, part: Callable[[int], contextlib.AbstractContextManager]):
    """While active, each layer's `mlp` maps its input [batch, seq, hidden] in `chunks`
    sequence chunks and concatenates the outputs (nothing changes for `chunks` <= 1).
    Chunk k runs inside `part(k)` (the capture tags its ops, forward and backward, with it).

    The chunked forward is set on the module instances, so module hooks (the capture's
    annotations) still see every call; it is removed on exit.
    """
    mlps = [block_mlp(layer) for layer in layers] if chunks > 1 else []
    if None in mlps:
        block = type(layers[mlps.index(None)]).__name__
        raise CaptureError(f"mlp_chunks needs each block's MLP submodule, but {block} has none named mlp, "
                           "feed_forward or ffn; drop mlp_chunks")

    def chunked(mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        outputs = []
        for k, (start, end) in enumerate(slice_bounds(hidden.shape[1], chunks)):
            with part(k):
                outputs.append(type(mlp).forward(mlp, hidden[:, start:end]))
        return torch.cat(outputs, dim=1)

    for mlp in mlps:
        mlp.forward = functools.partial(chunked, mlp)
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward


def chunked_lm_loss(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunks: int,
    annotator: _ModuleAnnotator,
    vocab_slices: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM loss with the LM head and cross-entropy computed chunk by chunk.

    With `vocab_slices > 0` each chunk's head and loss stream over that many vocabulary
    slices (`sliced_linear_cross_entropy`) instead of materializing the chunk's logits.

    Equals transformers' `ForCausalLMLoss` (labels shifted left, -100 ignored, mean over
    the rest): the sum of each chunk's summed cross-entropy divided by the token count.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.base_model, base.get_output_embeddings()
    if decoder is base or head is None:
        raise CaptureError(f"head_chunks and vocab_slices compute the LM head of {type(base).__name__} "
                           "themselves, but it has no separate decoder body and output embedding; drop them")
    if getattr(head, "bias", None) is not None:
        raise CaptureError(f"head_chunks and vocab_slices support an LM head without bias, but "
                           f"{type(base).__name__}'s has one; drop them")
    prefix = next(name for name, module in model.named_modules() if module is decoder) + "."
    decoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hidden = functional_call(decoder, decoder_state, (), {"input_ids": input_ids, "attention_mask": attention_mask,
                                                          "use_cache": False})
    hidden = hidden.last_hidden_state
    name_of = {id(p): name for name, p in model.named_parameters()}
    weight = state[name_of[id(head.weight)]]
    # A head with LoRA runs as its own module (peft's forward), its weights from the step's state.
    head_state = {n: state[name_of[id(p)]] for n, p in head.named_parameters()}
    head_trains = any(p.requires_grad for p in head.parameters())
    softcap = getattr(base.config, "final_logit_softcapping", None)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    total = hidden.new_zeros(())
    for c, (h, y) in enumerate(zip(hidden.tensor_split(chunks, dim=1), shift.tensor_split(chunks, dim=1))):
        with annotator.region({"module": f"lm_head.chunk{c}", "block": annotator.num_blocks + c}):
            if vocab_slices:
                part = sliced_linear_cross_entropy(h, weight, y, vocab_slices, softcap)
            else:
                logits = (functional_call(head, head_state, (h,)) if head_trains
                          else torch.nn.functional.linear(h, weight))
                if softcap is not None:  # in the model's dtype, then fp32 for the loss, as transformers does
                    logits = torch.tanh(logits / softcap) * softcap
                logits = logits.float()
                part = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         ignore_index=-100, reduction="sum")
        total = total + part
    return total / (shift != -100).sum()


#: The batch keys a training step takes; `attention_mask` is optional.
BATCH_KEYS = ("input_ids", "labels", "attention_mask")


def _check_batch(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    missing = {"input_ids", "labels"} - set(batch)
    if missing:
        raise CaptureError(f"the batch lacks {sorted(missing)}; pass input_ids and labels")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise CaptureError(f"the batch has keys {unknown} the step does not take (it takes {', '.join(BATCH_KEYS)}); "
                           "remove them rather than have them ignored")
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    for key, t in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2:
            raise CaptureError(f"batch['{key}'] must be an int64 tensor [batch, seq], got {_describe(t)}")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dtype in (torch.int64, torch.bool)):
        raise CaptureError(f"batch['attention_mask'] must be an int64 or bool tensor [batch, seq] (1 or True at "
                           f"tokens, 0 or False at padding), got {_describe(mask)}")
    for key, t in (("labels", labels), ("attention_mask", mask)):
        if t is not None and t.shape != input_ids.shape:
            raise CaptureError(f"input_ids {tuple(input_ids.shape)} and {key} {tuple(t.shape)} differ in shape")
    return input_ids, labels, mask


def _check_chunked_head(model: torch.nn.Module, lora: Mapping[str, torch.Tensor], vocab_slices: int) -> None:
    """Refuse a trainable LM head (LoRA on it, or peft's `modules_to_save` copy of it or of the
    input embedding it is tied to) where the chunked head cannot train it (a vocabulary-sliced loss)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    on_head = sorted(name for name, p in lora.items() if any(p is q for q in head.parameters()))
    if on_head and vocab_slices:
        raise CaptureError(
            f"a trainable LM head ({', '.join(on_head)}) cannot be trained with vocab_slices: the sliced loss "
            "streams a frozen head weight and returns no gradient for it; drop lm_head from the LoRA targets "
            "and from modules_to_save (embed_tokens too where the head is tied to it), or use head_chunks "
            "instead")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class _ModuleAnnotator:
    """Hooks that tag every traced op with its module name and transformer block.

    Forward: a pre-hook on every module enters `fx_traceback.annotate({"module", "block",
    "part"})` and the forward hook leaves it (`part` is set by `part`, else None). Each
    module call also records which autograd sequence numbers were created inside it. Backward: a pre-hook on every autograd node of the loss
    enters the annotation of the module that created that node.
    """

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList) -> None:
        self.model = model
        self.num_blocks = len(layers)
        self.block_of_layer = {id(layer): i for i, layer in enumerate(layers)}
        self.block_names = {id(m): n for n, m in model.named_modules() if id(m) in self.block_of_layer}
        self.origin_of_seq: dict[int, dict[str, Any]] = {}
        self.block_calls: list[tuple[int, int | None]] = []  # (block called, block open around it)
        self._open: list[tuple[contextlib.AbstractContextManager, int, dict[str, Any]]] = []
        self._part: int | None = None
        self._handles: list[Any] = []
        self._block_stack: list[int | None] = [None]

    @contextlib.contextmanager
    def installed(self):
        block_stack = self._block_stack
        for name, module in self.model.named_modules():
            block = self.block_of_layer.get(id(module))

            def pre_hook(mod, args, name=name, block=block):
                if block is not None:
                    self.block_calls.append((block, block_stack[-1]))
                    block_stack.append(block)
                tag = {"module": name, "block": block_stack[-1], "part": self._part}
                ctx = fx_traceback.annotate(tag)
                ctx.__enter__()
                self._open.append((ctx, torch.autograd._get_sequence_nr(), tag))

            def post_hook(mod, args, output, block=block):
                ctx, start, tag = self._open.pop()
                ctx.__exit__(None, None, None)
                for seq in range(start, torch.autograd._get_sequence_nr()):
                    self.origin_of_seq.setdefault(seq, tag)
                if block is not None:
                    block_stack.pop()

            self._handles.append(module.register_forward_pre_hook(pre_hook))
            self._handles.append(module.register_forward_hook(post_hook))
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            while self._open:
                self._open.pop()[0].__exit__(None, None, None)

    def check_block_order(self) -> None:
        """Raise CaptureError unless the forward ran every block once, in order, none inside another."""
        called = [block for block, _ in self.block_calls]
        nested = [(block, outer) for block, outer in self.block_calls if outer is not None]
        name = {i: self.block_names.get(id_, str(i)) for id_, i in self.block_of_layer.items()}
        if nested:
            block, outer = nested[0]
            raise CaptureError(f"block '{name[block]}' runs inside block '{name[outer]}': mebp needs the "
                               "decoder blocks to run one after another")
        if called != list(range(self.num_blocks)):
            raise CaptureError(f"the forward called the decoder blocks in the order {called}, not each of the "
                               f"{self.num_blocks} once in order: blocks shared or skipped across the stack "
                               "(as in weight-shared or hybrid models) cannot be checkpointed block by block")

    def trace_error(self, exc: Exception) -> CaptureError:
        """A CaptureError for an exception raised while tracing, naming the module it was raised in."""
        module = self._open[-1][2]["module"] if self._open else ""
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        where = f"module '{module}'" if module else "the model's top level"
        return CaptureError(f"cannot trace {where}: {type(exc).__name__}: {first_line}")

    @contextlib.contextmanager
    def part(self, index: int):
        """Tag the ops traced inside the `with` block, and the modules called there, as part
        `index` of the innermost module being called (forward and backward)."""
        outer, self._part = self._part, index
        try:
            with self.region({**(self._open[-1][2] if self._open else {}), "part": index}):
                yield
        finally:
            self._part = outer

    @contextlib.contextmanager
    def region(self, tag: dict[str, Any]):
        """Annotate ops traced inside the `with` block (forward and backward) like a module call.

        Modules called inside it belong to the region's block (when its tag names one)."""
        start = torch.autograd._get_sequence_nr()
        blocks = [tag["block"]] if tag.get("block") is not None else []
        self._block_stack.extend(blocks)
        try:
            with fx_traceback.annotate(tag):
                yield
        finally:
            del self._block_stack[len(self._block_stack) - len(blocks):]
        for seq in range(start, torch.autograd._get_sequence_nr()):
            self.origin_of_seq.setdefault(seq, tag)

    def annotate_backward(self, loss: torch.Tensor) -> None:
        """Hook every autograd node reachable from `loss` to annotate the ops it runs."""
        seen = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
            tag = self.origin_of_seq.get(node._sequence_nr(), {"module": "", "block": None})
            open_ctx: list[contextlib.AbstractContextManager] = []

            def pre(grad_outputs, tag=tag, open_ctx=open_ctx):
                ctx = fx_traceback.annotate(tag)
                ctx.__enter__()
                open_ctx.append(ctx)

            def post(grad_inputs, grad_outputs, open_ctx=open_ctx):
                open_ctx.pop().__exit__(None, None, None)

            node.register_prehook(pre)
            node.register_hook(post)


def replace_intermediate_mutations(gm: fx.GraphModule) -> int:
    """Replace each in-place op on a tensor the step computed (`x.masked_fill_(...)`) by its
    out-of-place form, read by every later use of `x`; the number replaced.

    Exact when nothing else sees the write: the op writes only `x`, `x` shares its storage
    with no graph input, and no other view of that storage made before the op is read after
    it. Mutations that fail these checks stay, and `_check_op` refuses them by name. The
    graph's fake values are propagated again afterwards, so aliasing and sizes describe the
    new graph.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_storages = {_storage_id(t) for p in placeholders for t in _outputs(p.meta.get("val"))
                      if isinstance(t, torch.Tensor)}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.set_.source_Tensor and node.args[0] is node.args[1]:
            node.replace_all_uses_with(node.args[0])  # x.set_(x) changes nothing (a router's `.type()`)
            gm.graph.erase_node(node)
            replaced += 1
            continue
        functional = _out_of_place(node)
        if functional is None:
            continue
        self_node = node.args[0]
        val = self_node.meta.get("val") if isinstance(self_node, fx.Node) else None
        if not isinstance(val, torch.Tensor) or _storage_id(val) in input_storages:
            continue
        # A write into a slice of a computed tensor (`key[..., :d].copy_(k)`, or through several
        # slices and selects, `attn[..., i, :i] = row`) becomes a chain of scatters: each view in
        # the chain gets its new value, written back into its base, up to the tensor itself, and
        # every later reader of a level reads its new value.
        chain = [self_node]
        while chain[-1].op == "call_function" and chain[-1].target in _SCATTER_OF_VIEW:
            chain.append(chain[-1].args[0])
        if not _write_is_private(gm, node, set(chain), _storage_id(val), order):
            continue
        with gm.graph.inserting_after(node):
            values = [gm.graph.call_function(functional, node.args, node.kwargs)]
        values[0].meta = dict(node.meta)
        for view, base in zip(chain, chain[1:]):
            with gm.graph.inserting_after(values[-1]):
                values.append(gm.graph.call_function(_SCATTER_OF_VIEW[view.target], (base, values[-1], *view.args[1:]),
                                                     view.kwargs))
            values[-1].meta = dict(base.meta)
        for level, value in zip(chain, values):
            for user in list(level.users):
                if user is not node and user not in values and order.get(user, -1) > order[node]:
                    user.replace_input_with(level, value)
        node.replace_all_uses_with(values[0])
        gm.graph.erase_node(node)
        position = order.pop(node)
        order.update({value: position for value in values})
        replaced += 1
    if replaced:
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        fake_mode = torch._guards.detect_fake_mode([p.meta["val"] for p in placeholders])
        gm.recompile()
        FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*(p.meta["val"] for p in placeholders))
    return replaced


def contiguous_before_uncertain_views(gm: fx.GraphModule) -> int:
    """Insert `clone(memory_format=contiguous)` before each `aten.view` whose input's strides at run
    time may differ from the traced ones; the number inserted.

    A pointwise op's kernel lays its output out like its inputs (TensorIterator), and where the
    inputs disagree the fake kernels of some untagged pointwise backward ops (`softplus_backward`)
    pick another layout than the CPU kernel does. A later `view` that was valid on the traced
    strides then fails at run time (Doge's gate). Such layouts are followed through pointwise
    ops and views; the clone makes the view's input contiguous on either layout, and it is a
    graph node, so its bytes are counted like any other value's.
    """
    fake_mode = torch._guards.detect_fake_mode(
        [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and "val" in n.meta])
    uncertain: set[fx.Node] = set()
    inserted = 0
    for node in list(gm.graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.target is torch.ops.aten.view.default and source in uncertain:
            with gm.graph.inserting_before(node), fake_mode:
                clone = gm.graph.call_function(torch.ops.aten.clone.default, (source,),
                                               {"memory_format": torch.contiguous_format})
                clone.meta = {**source.meta, "val": source.meta["val"].clone(memory_format=torch.contiguous_format)}
            node.replace_input_with(source, clone)
            inserted += 1
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        if torch.Tag.pointwise in node.target.tags or node.target.is_view:
            if any(a in uncertain for a in node.all_input_nodes):
                uncertain.add(node)
        elif node.target.__name__.split(".")[0].endswith("_backward"):
            same_shape = [a.meta["val"] for a in node.all_input_nodes
                          if isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].shape == val.shape]
            if any(a in uncertain for a in node.all_input_nodes) or len({_stride_order(t) for t in same_shape}) > 1:
                uncertain.add(node)
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return inserted


def _stride_order(t: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of size > 1 from the outermost stride to the innermost: a tensor's layout."""
    return tuple(sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: -t.stride(d)))


#: The out-of-place scatter that writes a view op's result back into its base.
_SCATTER_OF_VIEW = {
    torch.ops.aten.slice.Tensor: torch.ops.aten.slice_scatter.default,
    torch.ops.aten.select.int: torch.ops.aten.select_scatter.default,
}


def _write_is_private(gm: fx.GraphModule, node: fx.Node, chain: set[fx.Node], storage: int,
                      order: dict[fx.Node, int]) -> bool:
    """Whether no tensor sharing `storage`, made before `node`, is read after it - except the views
    in `chain` (the written view and its bases), whose later reads the caller redirects."""
    for other in gm.graph.nodes:
        if other in chain or other is node or other not in order or order[other] > order[node]:
            continue
        if not any(isinstance(t, torch.Tensor) and _storage_id(t) == storage for t in _outputs(other.meta.get("val"))):
            continue
        if any(order.get(user, len(order)) > order[node] for user in other.users):
            return False
    return True


def _out_of_place(node: fx.Node) -> torch._ops.OpOverload | None:
    """The out-of-place overload of an in-place ATen op that writes only its first argument, else None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
        return None
    written = [a for a in target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    name = target._schema.name.split("::")[-1]
    if len(written) != 1 or written[0] is not target._schema.arguments[0] or not name.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    overload = getattr(packet, target._overloadname, None) if packet is not None else None
    if overload is None or overload._schema.is_mutable:
        return None
    return overload


def _tensor_infos(gm: fx.GraphModule, specs: list[InputSpec]) -> dict[str, TensorInfo]:
    """Derive a TensorInfo for every node; raise UnsupportedOpError for ops we cannot schedule."""
    role_of_input = {s.name: s.role for s in specs}
    output_node = gm.graph.output_node()
    loss_node = output_node.args[0][0]
    info: dict[str, TensorInfo] = {}
    phase = Phase.FORWARD
    current_block, current_part = None, None  # of the latest backward op that had a block
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        custom = node.meta.get("custom", {})
        module = custom.get("module", "")
        block, part = custom.get("block"), custom.get("part")
        if node.op == "placeholder":
            info[node.name] = make_info(node, role_of_input[node.name], Phase.INPUT)
            continue
        if node.op == "get_attr":
            _check_constant(gm, node, module)
            info[node.name] = make_info(node, Role.FROZEN, Phase.INPUT)
            continue
        _check_op(node, module)
        if phase == Phase.BACKWARD:
            # Ops the autograd engine inserts itself (gradient accumulation) belong to no
            # module; they run inside the current block's backward, so they join it.
            if block is None:
                block, part = current_block, current_part
            current_block, current_part = block, part
        if node is loss_node:
            role = Role.LOSS
        else:
            role = Role.ACTIVATION if phase == Phase.FORWARD else Role.GRADIENT
        info[node.name] = make_info(node, role, phase, block=block, part=part, module=module)
        if node is loss_node:
            phase = Phase.BACKWARD
    return info


def _check_constant(gm: fx.GraphModule, node: fx.Node, module: str) -> None:
    value = getattr(gm, node.target)
    if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > MAX_CONSTANT_BYTES:
        raise CaptureError(
            f"a {tuple(value.shape)} tensor from module '{module}' was baked into the graph as "
            "a constant; register it as a parameter or buffer so it becomes a streamable input"
        )


def _check_op(node: fx.Node, module: str) -> None:
    target = node.target
    if node.op != "call_function":
        raise UnsupportedOpError(str(target), module, f"node kind '{node.op}' is not expected", "")
    if target is operator.getitem:
        return
    if not isinstance(target, torch._ops.OpOverload):
        raise UnsupportedOpError(
            str(target), module, "not an ATen operator",
            "Report the model class; only ATen ops can be scheduled.",
        )
    if torch.Tag.nondeterministic_seeded in target.tags:
        raise UnsupportedOpError(
            str(target), module, "it draws random numbers, so a recomputation would differ",
            "Set dropout probabilities to 0 (LoRA dropout too) or call model.eval().",
        )
    if target._schema.is_mutable:
        raise UnsupportedOpError(
            str(target), module, "it mutates a tensor in place",
            "Mutating ops cannot be recomputed safely; use the out-of-place form.",
        )


def make_info(
    node: fx.Node,
    role: Role,
    phase: Phase,
    *,
    block: int | None = None,
    part: int | None = None,
    module: str = "",
) -> TensorInfo:
    """TensorInfo of `node` from its fake-tensor value (`node.meta['val']`)."""
    val = node.meta.get("val")
    outputs = _outputs(val)
    nbytes = tuple(t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else 0 for t in outputs)
    if node.target is operator.getitem:
        alias: tuple[int | None, ...] = (0,)
    else:
        alias = tuple(_alias_input(node, t) if isinstance(t, torch.Tensor) else None for t in outputs)
    single = isinstance(val, torch.Tensor)
    return TensorInfo(
        role=role,
        phase=phase,
        shape=tuple(val.shape) if single else None,
        dtype=str(val.dtype).removeprefix("torch.") if single else None,
        output_nbytes=nbytes,
        output_alias=alias,
        flops=_flops(node, val) if node.op == "call_function" and None in alias else 0,
        block=block,
        part=part,
        module=module,
    )


def _outputs(val: Any) -> list[Any]:
    """A node's outputs by position: one for a tensor, one per element for a tuple/list."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return list(val)
    return []


def _alias_input(node: fx.Node, out: torch.Tensor) -> int | None:
    """Index into node.all_input_nodes of the input whose storage `out` shares, else None."""
    storage = _storage_id(out)
    for i, arg in enumerate(node.all_input_nodes):
        for t in _outputs(arg.meta.get("val")):
            if isinstance(t, torch.Tensor) and _storage_id(t) == storage:
                return i
    return None


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _flops(node: fx.Node, val: Any) -> int:
    """FLOPs of one op: torch's own counter formulas for matmul-like ops, else one per output element."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet in flop_registry:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        return int(flop_registry[packet](*args, **kwargs, out_val=val))
    flat, _ = tree_flatten(val)
    return sum(t.numel() for t in flat if isinstance(t, torch.Tensor))

