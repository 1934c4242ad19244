"""Sparse Mixture-of-Experts causal LMs: where each MoE block's gate (router) and expert weights
are, and the form the ONNX decoder is exported from.

Layouts, as data (transformers >= 5 stores a block's experts as two fused 3-D tensors, and
converts older per-expert checkpoints to them when it loads them):

================  =========================================================================
model_type        MoE block ``model.layers.<i>.mlp``
================  =========================================================================
``mixtral``       ``gate.weight`` [E, d] (top-k softmax router), ``experts.gate_up_proj``
                  [E, 2I, d] (gate rows, then up rows), ``experts.down_proj`` [E, d, I]
``qwen2_moe``     the same, plus ``shared_expert`` (a dense MLP every token runs) and
                  ``shared_expert_gate.weight`` [1, d] (a sigmoid gate on it)
``olmoe``         as ``mixtral``
================  =========================================================================

Any other block with that structure (``gate.weight`` 2-D beside ``experts.gate_up_proj`` /
``experts.down_proj`` 3-D, e.g. ``qwen3_moe``) is found too, as layout ``fused-experts``.
Gates are never quantized: a quantized router flips expert choices.

**Export.** None of transformers' expert implementations exports to an ONNX graph that integer
or 4-bit kernels can run (transformers 5.24, torch 2.14, checked on tiny Mixtral / Qwen2-MoE /
OLMoE models):

- ``eager`` loops over ``nonzero()`` of the routing mask: ``torch.export`` cannot guard the
  data-dependent size (``GuardOnDataDependentSymNode: Eq(u0, 0)``);
- ``grouped_mm`` (the CPU default) calls the custom op ``transformers::grouped_mm_fallback``,
  which has no ONNX function (``DispatchError``);
- ``batched_mm`` exports, but gathers every token's expert matrices (``Gather`` on the 3-D
  weights, then ``MatMul`` of two activations): no constant-weight MatMul is left for
  MatMulNBits / MatMulInteger, and memory grows as tokens x expert size.

:func:`export_form` therefore swaps each block's ``experts`` module, for the export only, for
a dense form (``_DenseExperts``): every expert's three matrices as separate weights (views of the fused
tensors, named ``<block>.experts.{gate,up,down}_proj.<e>``), every expert applied to every
token and weighted by the dense routing weights (zero where the router did not pick it). The
router is the model's own. Same function (the build checks the ONNX graph against the
unmodified torch model); it costs E / top_k times the expert FLOPs of a sparse kernel. ONNX
Runtime's fused ``MoE`` / ``QMoE`` contrib ops are sparse but take one weight width for all
experts of a node, so they cannot hold a per-expert bit allocation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from moqe_compile.errors import BuildError

LAYOUTS = {  # model_type -> what the block holds beside gate + fused experts
    "mixtral": {"shared_expert": False},
    "qwen2_moe": {"shared_expert": True},
    "olmoe": {"shared_expert": False},
}
MATRICES = ("gate_proj", "up_proj", "down_proj")
GATE_HISTORY_FILE = "moe_gate_history.safetensors"


@dataclass
class MoEBlock:
    """One sparse MoE block. ``name`` is its module path (``model.layers.3.mlp``)."""

    layer: int  # decoder layer index
    name: str
    block: object = field(repr=False)
    experts: object = field(repr=False)  # the model's own (fused) experts module
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int

    @property
    def gate_param(self) -> str:
        return f"{self.name}.gate.weight"

    @property
    def extra_gate_params(self) -> list[str]:
        return [f"{self.name}.shared_expert_gate.weight"] if hasattr(self.block, "shared_expert_gate") else []

    def gate_weight(self):
        """The router weight [E, d] (torch, shares storage with the model)."""
        return self.block.gate.weight

    def expert(self, e: int) -> dict:
        """Expert ``e``'s matrices as (out, in) torch views of the fused tensors:
        gate_proj [I, d], up_proj [I, d], down_proj [d, I]."""
        i, gu = self.intermediate, self.experts.gate_up_proj.data
        return {"gate_proj": gu[e, :i], "up_proj": gu[e, i:], "down_proj": self.experts.down_proj.data[e]}

    def param_name(self, e: int, matrix: str) -> str:
        """The export form's name of one expert matrix (the ONNX initializer name ends with it)."""
        return f"{self.name}.experts.{matrix}.{e}"


@dataclass
class MoEModel:
    layout: str
    blocks: list[MoEBlock]

    @property
    def num_experts(self) -> int:
        return self.blocks[0].num_experts

    @property
    def top_k(self) -> int:
        return self.blocks[0].top_k

    def expert_params(self) -> int:
        """Parameters in routed expert matrices (what an expert-wise bit allocation spends on)."""
        return sum(3 * b.num_experts * b.hidden * b.intermediate for b in self.blocks)

    def describe(self) -> dict:
        b = self.blocks[0]
        return {"layout": self.layout, "moe_layers": [x.layer for x in self.blocks], "num_experts": self.num_experts,
                "top_k": self.top_k, "hidden": b.hidden, "expert_intermediate": b.intermediate,
                "expert_params": self.expert_params(),
                "shared_expert": any(hasattr(x.block, "shared_expert") for x in self.blocks),
                "gates": "FP (never quantized)",
                "export": "dense: every expert on every token, weighted by the sparse routing weights"}


def _layer_index(name: str) -> int:
    parts = name.split(".")
    nums = [int(p) for p in parts if p.isdigit()]
    return nums[-1] if nums else -1


def find_moe(model) -> MoEModel | None:
    """The model's sparse MoE blocks, or None for a dense model. Raises BuildError for an MoE
    block whose experts are stored in a way this module does not know."""
    blocks = []
    for name, mod in model.named_modules():
        gate, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
        if gate is None or experts is None:
            continue
        gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        gw = getattr(gate, "weight", None)
        if gu is None or down is None or gw is None or gu.dim() != 3 or down.dim() != 3 or gw.dim() != 2:
            raise BuildError(f"MoE block {name!r}: experts of type {type(experts).__name__} are not stored as "
                             "fused gate_up_proj [E, 2I, d] / down_proj [E, d, I] tensors with a gate.weight "
                             "[E, d] router (the transformers >= 5 Mixtral / Qwen2-MoE / OLMoE layout).")
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) \
                or not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
            raise BuildError(f"MoE block {name!r}: transposed, biased, interleaved or ungated experts are not "
                             "supported (only [gate; up] concatenated, bias-free, (out, in) weights).")
        E, two_i, d = gu.shape
        if gw.shape != (E, d) or down.shape != (E, d, two_i // 2):
            raise BuildError(f"MoE block {name!r}: gate {tuple(gw.shape)}, gate_up_proj {tuple(gu.shape)}, "
                             f"down_proj {tuple(down.shape)} do not agree.")
        top_k = getattr(gate, "top_k", None) or getattr(model.config, "num_experts_per_tok", None)
        if not top_k:
            raise BuildError(f"MoE block {name!r}: cannot tell how many experts each token uses (top_k).")
        blocks.append(MoEBlock(_layer_index(name), name, mod, experts, E, int(top_k), d, two_i // 2))
    if not blocks:
        return None
    mt = getattr(model.config, "model_type", "")
    return MoEModel(mt if mt in LAYOUTS else "fused-experts", blocks)


def _dense_experts_class():
    import torch
    from torch import nn

    class _DenseExperts(nn.Module):
        """Export form of one block's experts: out = sum_e w_e(token) * down_e(act(gate_e x) * up_e x)."""

        def __init__(self, blk: MoEBlock):
            super().__init__()
            self.num_experts, self.act_fn = blk.num_experts, blk.experts.act_fn
            mats = [blk.expert(e) for e in range(blk.num_experts)]
            for m in MATRICES:  # views of the fused tensors: no copy
                setattr(self, m, nn.ParameterList([nn.Parameter(x[m], requires_grad=False) for x in mats]))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            x = hidden_states  # (T, d)
            w = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
            w = w.scatter(1, top_k_index, top_k_weights.to(x.dtype))  # (T, E), zero where not routed
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                h = self.act_fn(nn.functional.linear(x, self.gate_proj[e])) * nn.functional.linear(x, self.up_proj[e])
                out = out + nn.functional.linear(h, self.down_proj[e]) * w[:, e : e + 1]
            return out

    return _DenseExperts


@contextlib.contextmanager
def export_form(model):
    """Within the block, the model's MoE blocks run the dense export form (no-op for a dense model)."""
    moe = find_moe(model)
    if moe is None:
        yield None
        return
    cls = _dense_experts_class()
    for b in moe.blocks:
        b.block.experts = cls(b)
    try:
        yield moe
    finally:
        for b in moe.blocks:
            b.block.experts = b.experts


def _matches(init_name: str, param: str) -> bool:
    return init_name == param or init_name.endswith("." + param)


def onnx_moe_nodes(onnx_model, moe: MoEModel) -> dict:
    """Which MatMul nodes of an exported decoder (after ``model.py``'s Gemm -> MatMul fold) hold
    the gates and each expert's matrices: ``{"gates": [node], "experts": {(block i, e): {matrix:
    node}}}``. Raises BuildError when an expected weight is not found."""
    g = onnx_model.graph
    inits = {i.name for i in g.initializer}
    by_weight = {}
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            by_weight.setdefault(n.input[1], []).append(n.name)
    weights = list(by_weight)

    def find(param: str) -> list[str]:
        hits = [w for w in weights if _matches(w, param)]
        return [n for w in hits for n in by_weight[w]]

    gates, experts = [], {}
    for i, b in enumerate(moe.blocks):
        for p in [b.gate_param, *b.extra_gate_params]:
            nodes = find(p)
            if not nodes:
                raise BuildError(f"the exported decoder has no MatMul on the gate weight {p!r}.")
            gates += nodes
        for e in range(b.num_experts):
            experts[(i, e)] = {}
            for m in MATRICES:
                nodes = find(b.param_name(e, m))
                if len(nodes) != 1:
                    raise BuildError(f"expected one MatMul on {b.param_name(e, m)!r} in the exported decoder, "
                                     f"found {len(nodes)}.")
                experts[(i, e)][m] = nodes[0]
    return {"gates": gates, "experts": experts}


def gate_nodes(onnx_path, moe: MoEModel | None) -> list[str]:
    """The gate MatMuls of an exported decoder (empty for a dense model): left FP by every recipe."""
    if moe is None:
        return []
    import onnx

    return onnx_moe_nodes(onnx.load(str(onnx_path), load_external_data=False), moe)["gates"]
