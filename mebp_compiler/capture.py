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
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functional_call
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_flatten

from mebp_compiler.ir import InputSpec, Phase, Role, TensorInfo, TrainingGraph
from mebp_compiler.models import decoder_layers
from mebp_compiler.sliced_loss import slice_bounds, sliced_linear_cross_entropy

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


def capture(
    model: torch.nn.Module,
    example_batch: Mapping[str, torch.Tensor],
    *,
    backward: bool = True,
    head_chunks: int = 0,
    vocab_slices: int = 0,
    mlp_chunks: int = 0,
) -> TrainingGraph:
    """Trace one training step of `model` on a batch shaped like `example_batch`.

    `model` is a causal LM whose trainable parameters are the LoRA parameters (e.g. from
    `mebp_compiler.models.add_lora`); `example_batch` holds `input_ids` and `labels`,
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
    """
    if mlp_chunks < 0 or mlp_chunks > example_batch["input_ids"].shape[-1]:
        raise CaptureError(f"mlp_chunks must be between 0 and the sequence length, got {mlp_chunks}")
    if vocab_slices < 0:
        raise CaptureError(f"vocab_slices must be 0 (off) or a positive number of slices, got {vocab_slices}")
    if head_chunks < 0 or head_chunks > example_batch["input_ids"].shape[-1]:
        raise CaptureError(f"head_chunks must be between 0 and the sequence length, got {head_chunks}")
    input_ids, labels, attention_mask = _check_batch(example_batch)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise CaptureError(
            "the model has transformers' gradient checkpointing enabled; call "
            "model.gradient_checkpointing_disable() - mebp schedules recomputation itself"
        )
    params = dict(model.named_parameters())
    lora = {k: p for k, p in params.items() if p.requires_grad}
    if not lora:
        raise CaptureError(
            "the model has no trainable parameters: add LoRA adapters first, e.g. "
            "mebp_compiler.models.add_lora(model)"
        )
    frozen = {k: p for k, p in params.items() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))
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
        grads = torch.autograd.grad(loss, flat[n_frozen : n_frozen + n_lora])
        return (loss, *grads)

    tracer_state = _ModuleAnnotator(model, decoder_layers(model))
    annotate_backward = tracer_state.annotate_backward
    # preserve_node_meta outermost: an error inside the trace closes the annotations it holds first.
    with (fx_traceback.preserve_node_meta(), tracer_state.installed(),
          chunked_mlps(decoder_layers(model), mlp_chunks, tracer_state.part)):
        gm = make_fx(step, tracing_mode="fake")(*flat_inputs)
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
        num_blocks=len(decoder_layers(model)),
        batch_shape=tuple(input_ids.shape),
        meta={"head_chunks": head_chunks, "vocab_slices": vocab_slices, "mlp_chunks": mlp_chunks},
    )


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
    mlps = [layer.mlp for layer in layers] if chunks > 1 else []

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
    decoder, head = base.model, base.get_output_embeddings()
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
                          else torch.nn.functional.linear(h, weight)).float()
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
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
    """Refuse LoRA on the LM head where the chunked head cannot train it (a vocabulary-sliced loss)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    on_head = sorted(name for name, p in lora.items() if any(p is q for q in head.parameters()))
    if on_head and vocab_slices:
        raise CaptureError(
            f"LoRA on the LM head ({', '.join(on_head)}) cannot be trained with vocab_slices: the sliced loss "
            "streams a frozen head weight and returns no gradient for it; drop lm_head from the LoRA targets "
            "or use head_chunks instead")


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
        self.origin_of_seq: dict[int, dict[str, Any]] = {}
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

