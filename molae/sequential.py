"""A checkpoint's decoder layers run one at a time on carried hidden states: the calibration side of a
layer-by-layer conversion, as GPTQ and llm-compressor's sequential pipeline do it.

The family's causal LM is built on the meta device (no memory). Only the embeddings, the final norm
and the rotary embedding are materialised; decoder layers are loaded from the shards one at a time
(`load`), run, and dropped. To learn what each layer is called with, the base model runs once per
calibration batch with every decoder layer replaced by a `_Recorder` that records its arguments and
returns its input: the first layer's hidden states (the embeddings) and each layer's keyword
arguments (attention mask for its layer type, position embeddings, position ids). Those are the same
for every pass, so later passes call `layer(hidden, *args, **kwargs)` directly.

A loaded MoE layer holds our standard `Experts` (the fast path, with the source's weights), so the
experts' inputs and routing can be captured by a hook (`run(..., capture=True)`) and a converted
experts module can be swapped in (`models.set_submodule`) before the layer runs again.

Peak memory: one layer's weights, the carried hidden states ([windows, seq, n] twice, in the source
dtype) and what the capture holds ([tokens, n] plus the routing), whatever the layer count.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .checkpoint import SourceCheckpoint
from .families import family
from .layers import Experts
from .models import find_experts, set_submodule


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during the recording pass: keeps its call, returns its input."""

    def __init__(self, index: int, sink: list):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states if self.index == 0 else None, args, kwargs))
        return hidden_states


def renamings(model_type: str) -> list[tuple[str, str]]:
    """(pattern, replacement) pairs that turn the family's on-disk tensor names into module names
    (transformers' own renamings for the family: Mixtral's block_sparse_moe -> mlp, PhiMoE's
    gate -> router); expert tensors are read by `convert.ExpertGroup`, not renamed."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    pairs = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(rule, WeightRenaming):
            pairs += list(zip(rule.source_patterns, rule.target_patterns))
    return pairs


class LayerRunner:
    """The decoder stack of `ckpt` (a supported MoE family), run one layer at a time on `device`.

    groups: {layer: convert.ExpertGroup} of the source's routed experts (how to read them)."""

    def __init__(self, ckpt: SourceCheckpoint, groups: dict, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.groups, self.device, self.dtype = ckpt, groups, torch.device(device), dtype
        cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}  # fp8 is dequantized on read
        config = AutoConfig.for_model(**cfg)
        config.output_router_logits, config.use_cache = False, False
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.base = model.model
        self.meta_layers = list(self.base.layers)
        self.rename = renamings(config.model_type)
        self.router = family(config.model_type).router
        self.module_key = {}  # module name -> disk name, for every tensor that is not a routed expert's
        expert_keys = {k for g in groups.values() for k in g.keys}
        for key in ckpt.keys():
            if key not in expert_keys:
                self.module_key[self._renamed(key)] = key
        for name in ("embed_tokens", "norm"):
            self._materialize(getattr(self.base, name), f"model.{name}.")
        with torch.device(self.device):  # its buffers (inv_freq) are computed, not stored
            self.base.rotary_emb = type(self.base.rotary_emb)(config=config)

    def _renamed(self, key: str) -> str:
        for pattern, target in self.rename:
            key = re.sub(pattern, target, key)
        return key

    def _state(self, module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """The module's persistent tensors read from the shards (on the device, the run's dtype for
        floating tensors), keyed by their names in the module."""
        names = [k for k in module.state_dict() if not k.startswith(skip)]
        missing = [prefix + k for k in names if prefix + k not in self.module_key]
        if missing:
            raise ValueError(f"{self.ckpt.path}: no tensor for {missing[0]} (of {len(missing)}): the checkpoint "
                             "does not match its config.json")
        read = self.ckpt.read([self.module_key[prefix + k] for k in names], self.device)
        return {k: _to(read[self.module_key[prefix + k]], self.device, self.dtype) for k in names}

    def _materialize(self, module: nn.Module, prefix: str):
        module.load_state_dict(self._state(module, prefix), strict=True, assign=True)

    @torch.no_grad()
    def start(self, ids_BT: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """Record each layer's call for each batch of calibration windows; returns the first layer's
        input hidden states per batch (on the device)."""
        sink: list = []
        self.base.layers = nn.ModuleList([_Recorder(i, sink) for i in range(len(self.meta_layers))])
        self.calls: list[list[tuple]] = []  # [batch][layer] -> (args, kwargs)
        hidden = []
        for b in range(0, len(ids_BT), batch_size):
            sink.clear()
            self.base(input_ids=ids_BT[b:b + batch_size].to(self.device), use_cache=False)
            by_layer = {i: (args, kwargs) for i, _, args, kwargs in sink}
            hidden.append(next(h for i, h, _, _ in sink if i == 0))
            self.calls.append([by_layer[i] for i in range(len(self.meta_layers))])
        return hidden

    def load(self, i: int) -> nn.Module:
        """Decoder layer i with its weights on the device; a MoE layer's routed experts as our standard
        `Experts` (the source's weights, read in its own layout)."""
        layer = copy.deepcopy(self.meta_layers[i])
        prefix = f"model.layers.{i}."
        found = find_experts(layer)
        group = self.groups.get(i)
        if found and group is None or group is not None and len(found) != 1:
            raise ValueError(f"layer {i}: {len(found)} experts modules in the model, "
                             f"{'one' if group else 'none'} in the checkpoint")
        skip = ()
        if group is not None:
            name, hf = found[0]
            E, F2, D = hf.gate_up_proj.shape
            if (E, F2 // 2, D) != (group.n_experts, group.inter, group.dim):
                raise ValueError(f"layer {i}: experts [{E}, {F2 // 2}, {D}] in config.json, "
                                 f"[{group.n_experts}, {group.inter}, {group.dim}] in the shards")
            with torch.device("meta"):
                experts = Experts(D, F2 // 2, E).to(self.dtype)
            experts.to_empty(device=self.device)
            with torch.no_grad():  # read straight into the parameters: no second copy of a kind's stack
                for kind in ("gate", "up", "down"):
                    group.read_kind(self.ckpt, kind, out=getattr(experts, f"{kind}_proj"))
            set_submodule(layer, name, experts)
            skip = (name + ".",)
        state = self._state(layer, prefix, skip)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.startswith(skip)]
        if missing or unexpected:
            raise ValueError(f"layer {i}: tensors {missing or unexpected} do not load into the family's layer")
        meta = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
        if meta:
            raise ValueError(f"layer {i}: {meta} are neither stored nor computed: molae cannot run this layer alone")
        return layer.eval()

    @torch.no_grad()
    def run(self, layer: nn.Module, i: int, hidden: list[torch.Tensor], capture: bool = False):
        """Layer i on each batch of carried hidden states: the outputs, and with capture the inputs of
        its experts module, their routing and the router's logits, concatenated over batches:
        (x [T, D], idx [T, K], w [T, K], logits [T, E])."""
        taken, logits, handles = [], [], []
        if capture:
            (name, experts), = find_experts(layer)
            handles.append(experts.register_forward_hook(
                lambda mod, args, kwargs, out: taken.append(tuple(a.detach() for a in (*args, *kwargs.values()))),
                with_kwargs=True))
            handles.append(router_of(layer, name, self.router).register_forward_hook(
                lambda mod, args, out: logits.append(out[0].detach().reshape(-1, out[0].shape[-1]))))
        try:
            out = []
            for b, h in enumerate(hidden):
                args, kwargs = self.calls[b][i]
                y = layer(h, *args, **kwargs)
                out.append(y[0] if isinstance(y, tuple) else y)
        finally:
            for handle in handles:
                handle.remove()
        if not capture:
            return out, None
        x, idx, w = (torch.cat([t[j] for t in taken]) for j in range(3))
        return out, (x, idx, w, torch.cat(logits))


def router_of(layer: nn.Module, experts_name: str, attr: str) -> nn.Module:
    """The router beside an experts module: its MoE block's `attr` (families.Family.router), which every
    supported family calls as router(hidden) -> (logits [T, E], top-k weights, top-k ids)."""
    block = layer.get_submodule(experts_name.rsplit(".", 1)[0]) if "." in experts_name else layer
    module = getattr(block, attr, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(block).__name__} has no `{attr}` router beside its experts: fix its entry in "
                         "molae/families.py")
    return module


def _to(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


__all__ = ["LayerRunner", "renamings"]
