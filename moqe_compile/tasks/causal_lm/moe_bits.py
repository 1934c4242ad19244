"""Expert-wise mixed precision for sparse MoE models (recipe key ``moe_bits``, preset
``moe-expert-bits``): one weight width per routed expert at a fixed average.

The method (Chowdhury et al., "Efficient Quantization of Mixture-of-Experts with Theoretical
Generalization Guarantees", ICLR 2026; the authors' code: github.com/nowazrabbani/moe_quantization,
``bitallocutils.py``), per MoE layer:

1. **Gate-norm change** Λ_e = ||w_e(T)||_2 − ||w_e(0)||_2 of expert e's router row between
   initialization and the end of training. Experts whose row changed *least* learned rarer but
   critical features and are the most sensitive to quantization: ranked first (most bits).
2. **MaxVar**: the maximum over the gate_proj (Mixtral ``w1``) neurons of the variance of each
   neuron's input weights. An expert ranked low whose MaxVar exceeds ``zeta`` times that of an expert
   ranked above it moves up to that expert's place (large intra-neuron variance = large
   quantization noise at low width). ``combined`` = 1 then 2, as the paper; ``gate-norm`` and
   ``maxvar`` alone are offered too (``maxvar`` ranks large MaxVar first, as the paper's text
   says; the authors' variance-only order sorts the other way round).
3. **Widths**: every layer gets the same number of experts per width. Two widths lo < hi:
   round(E (avg − lo) / (hi − lo)) experts at hi. Three equally spaced widths: the authors'
   policy (start from the two widths around avg, then move pairs of middle experts to lo + hi,
   which keeps the mean, as far as the region of avg allows). Other width sets: the two widths
   around avg. Rounding can miss avg by < (hi − lo) / E: the achieved mean is recorded.

Controls at the same widths and counts: ``random`` (a seeded permutation per layer),
``frequency`` (most often routed on the calibration windows = most bits: the heuristic the
paper argues against) and ``uniform`` (every expert at avg; in the bench only, a fractional avg
splits each expert's output rows between the two widths around it).

Without a gate-norm history (a downloaded checkpoint), criteria that need it fall back to
``maxvar`` and say so. The history is a safetensors file with ``init.<gate>`` (and optionally
``final.<gate>``) per gate weight (bench/moe_train.py writes one); a ``final`` that does not
match the model's gate means the history belongs to another checkpoint: also a fallback.

Quantizing the experts reuses the LM quantizers: on the ONNX path (the build) one pass of
``quantize_onnx`` per width over the MatMuls assigned that width (ORT's RTN or our GPTQ into
MatMulNBits), gates excluded; in torch (the bench's {2, 3, 4}-bit grid, fake-quant)
``quantize/nbits.py``'s blockwise RTN or ``quantize/gptq.py``'s blockwise GPTQ on each expert matrix,
with Hessians from the tokens routed to that expert.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moqe_compile.errors import BuildError, ConfigError

PAPER_CRITERIA = ("combined", "gate-norm", "maxvar")
NEEDS_HISTORY = ("combined", "gate-norm")


# ---------------------------------------------------------------- criteria

def gate_norm_change(init: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Λ_e = ||final_e|| − ||init_e|| per router row (E,)."""
    return np.linalg.norm(np.asarray(final, np.float64), axis=1) - np.linalg.norm(np.asarray(init, np.float64), axis=1)


def max_intra_neuron_variance(gate_proj: np.ndarray) -> float:
    """MaxVar: the largest, over the neurons (rows) of gate_proj [I, d], of the variance of the
    neuron's input weights (as the authors' Switch Transformer script computes it; their Mixtral
    helper takes the variance of the largest-l2-norm neuron instead)."""
    return float(np.asarray(gate_proj, np.float64).var(axis=1).max())


def combined_order(gate_order: list[int], maxvar: np.ndarray, zeta: float) -> list[int]:
    """The paper's MaxVar reordering of a gate-norm order (most bits first): going from the
    expert with the largest norm change up, an expert moves to the first place whose expert has
    MaxVar below its own divided by ``zeta``, if that place is ahead of it."""
    order = list(gate_order)
    for e in reversed(gate_order):
        pos = order.index(e)
        first = next((k for k, o in enumerate(order) if zeta * maxvar[o] < maxvar[e]), None)
        if first is not None and first < pos:
            order.insert(first, order.pop(pos))
    return order


def width_counts(num_experts: int, avg: float, widths) -> dict[int, int]:
    """How many experts of a layer get each width (see the module docstring)."""
    w = sorted(set(int(b) for b in widths))
    if not w[0] <= avg <= w[-1]:
        raise ConfigError(f"average bits {avg} is outside the widths {w}.")
    if len(w) == 1:
        return {w[0]: num_experts}
    if len(w) == 3 and w[2] - w[1] == w[1] - w[0]:
        return _three_level(num_experts, avg, *w)
    lo = max(b for b in w if b <= avg)
    hi = min((b for b in w if b > avg), default=lo)
    if hi == lo:
        return {b: (num_experts if b == lo else 0) for b in w}
    n_hi = int(round((avg - lo) / (hi - lo) * num_experts))
    return {b: (n_hi if b == hi else num_experts - n_hi if b == lo else 0) for b in w}


def _three_level(n: int, avg: float, lo: int, mid: int, hi: int) -> dict[int, int]:
    if avg >= mid:
        n_hi = int(round((avg - mid) / (hi - mid) * n))
        n_mid, n_lo, base = n - n_hi, 0, n_hi
    else:
        n_mid = int(round((avg - lo) / (mid - lo) * n))
        n_lo, n_hi, base = n - n_mid, 0, 0
    third = (hi - lo) / 3
    region = "high" if avg > hi - third else "mid" if avg >= hi - 2 * third else "low"
    while n_mid >= 2 and region != "low":  # a pair of middle experts -> one low + one high: same mean
        if region == "mid" and n_mid - 2 < n_hi + 1 - base:
            break
        n_lo, n_mid, n_hi = n_lo + 1, n_mid - 2, n_hi + 1
    return {lo: n_lo, mid: n_mid, hi: n_hi}


# ---------------------------------------------------------------- gate-norm history

def history_path(spec: str, model_path: str) -> Path:
    from moqe_compile.tasks.causal_lm.model import resolve_model_path
    from moqe_compile.tasks.causal_lm.moe import GATE_HISTORY_FILE

    if spec:
        return Path(spec)
    try:
        p = resolve_model_path(model_path)
    except ConfigError:
        return Path(model_path) / GATE_HISTORY_FILE
    return (p if p.is_dir() else p.parent) / GATE_HISTORY_FILE


def load_gate_history(path: Path, moe) -> tuple[list[dict] | None, str | None]:
    """([{"init", "final"} per MoE block] or None, reason when None)."""
    if not path.is_file():
        return None, f"no gate-norm history ({str(path)!r} not found)"
    from safetensors.numpy import load_file

    t = load_file(str(path))
    out = []
    for b in moe.blocks:
        init, final = t.get(f"init.{b.gate_param}"), t.get(f"final.{b.gate_param}")
        now = b.gate_weight().detach().float().numpy()
        if init is None:
            return None, f"gate-norm history {str(path)!r} has no 'init.{b.gate_param}'"
        if init.shape != now.shape:
            return None, f"gate-norm history {str(path)!r}: init.{b.gate_param} is {init.shape}, the model's {now.shape}"
        if final is not None and not np.allclose(final, now, atol=1e-6):
            return None, (f"gate-norm history {str(path)!r} ends at a different {b.gate_param} than this "
                          "model's: it belongs to another checkpoint")
        out.append({"init": init.astype(np.float64), "final": now.astype(np.float64)})
    return out, None


# ---------------------------------------------------------------- calibration statistics (torch)

@dataclass
class RoutingStats:
    """Per MoE block: how many calibration tokens chose each expert, and (optionally) each
    expert's input Hessians X^T X over the tokens routed to it: ``h_in`` for gate/up_proj,
    ``h_mid`` (act(gate) * up) for down_proj."""

    counts: np.ndarray  # (blocks, E)
    tokens: int
    h_in: list[list] | None = None
    h_mid: list[list] | None = None


def routing_stats(model, moe, calib_ids: np.ndarray, hessians: bool = False, batch: int = 8) -> RoutingStats:
    import torch

    nb, E = len(moe.blocks), moe.num_experts
    counts = np.zeros((nb, E), np.int64)
    h_in = [[None] * E for _ in range(nb)] if hessians else None
    h_mid = [[None] * E for _ in range(nb)] if hessians else None
    hooks = []

    def hook(i, blk):
        def f(_mod, args):
            x, idx = args[0].detach().float(), args[1]
            counts[i] += np.bincount(idx.reshape(-1).numpy(), minlength=E)[:E]
            if not hessians:
                return
            for e in range(E):
                rows = (idx == e).any(-1)
                if not bool(rows.any()):
                    continue
                xe = x[rows].double()
                w = blk.expert(e)
                he = (blk.experts.act_fn(xe.float() @ w["gate_proj"].T) * (xe.float() @ w["up_proj"].T)).double()
                h_in[i][e] = xe.T @ xe + (0 if h_in[i][e] is None else h_in[i][e])
                h_mid[i][e] = he.T @ he + (0 if h_mid[i][e] is None else h_mid[i][e])
        return f

    for i, b in enumerate(moe.blocks):
        hooks.append(b.experts.register_forward_pre_hook(hook(i, b)))
    try:
        with torch.no_grad():
            for s in range(0, len(calib_ids), batch):
                model(input_ids=torch.from_numpy(np.ascontiguousarray(calib_ids[s : s + batch])), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return RoutingStats(counts, int(calib_ids.size), h_in, h_mid)


# ---------------------------------------------------------------- allocation

@dataclass
class Allocation:
    """Bits per (MoE block, expert) and how they were chosen."""

    requested: str
    criterion: str  # what was used (differs from requested after a fallback)
    target_bits: float
    widths: list[int]
    bits: list[list[int]]  # (blocks, E)
    layers: list[int]
    fallback: str | None = None
    scores: dict = field(default_factory=dict)  # name -> (blocks, E) lists
    orders: list[list[int]] = field(default_factory=list)  # most bits first
    zeta: float = 3.0
    seed: int = 0
    history: dict | None = None

    @property
    def mean_bits(self) -> float:
        return float(np.mean(self.bits))

    def to_manifest(self) -> dict:
        return {"requested": self.requested, "criterion": self.criterion, "fallback": self.fallback,
                "target_bits": self.target_bits, "mean_bits": round(self.mean_bits, 4), "widths": self.widths,
                "zeta": self.zeta, "seed": self.seed, "gate_history": self.history,
                "per_layer": [{"layer": L, "bits": b, "order": o, **{k: [round(float(x), 6) for x in v[i]]
                                                                      for k, v in self.scores.items()}}
                              for i, (L, b, o) in enumerate(zip(self.layers, self.bits, self.orders))]}


def expert_scores(moe, history: list[dict] | None, counts: np.ndarray | None) -> dict:
    s = {"maxvar": [[max_intra_neuron_variance(b.expert(e)["gate_proj"].float().numpy())
                     for e in range(b.num_experts)] for b in moe.blocks]}
    if history is not None:
        s["gate_norm_change"] = [gate_norm_change(h["init"], h["final"]).tolist() for h in history]
    if counts is not None:
        s["frequency"] = (counts / np.maximum(counts.sum(1, keepdims=True), 1)).tolist()
    return s


def allocate(moe, requested: str, avg: float, widths, *, history: list[dict] | None = None,
             history_reason: str | None = None, counts: np.ndarray | None = None, zeta: float = 3.0,
             seed: int = 0, history_meta: dict | None = None, say=None) -> Allocation:
    """The allocation ``requested`` (``config.MOE_ALLOCATIONS``) at mean ``avg`` over ``widths``."""
    criterion, fallback = requested, None
    if requested in NEEDS_HISTORY and history is None:
        criterion = "maxvar"
        fallback = (f"{history_reason or 'no gate-norm history'}: the {requested!r} criterion needs the gate "
                    "weights at initialization; allocated by max intra-neuron variance instead")
        if say:
            say(f"moe-expert-bits: {fallback}")
    if requested == "frequency" and counts is None:
        raise BuildError("the 'frequency' allocation needs routing counts on calibration windows.")
    scores = expert_scores(moe, history, counts)
    E = moe.num_experts
    ws = sorted(set(int(b) for b in widths))
    rng = np.random.default_rng(seed)
    orders = []
    for i in range(len(moe.blocks)):
        var = np.asarray(scores["maxvar"][i])
        if criterion in NEEDS_HISTORY:
            gate = [int(e) for e in np.argsort(np.asarray(scores["gate_norm_change"][i]), kind="stable")]
            orders.append(combined_order(gate, var, zeta) if criterion == "combined" else gate)
        elif criterion == "maxvar":
            orders.append([int(e) for e in np.argsort(-var, kind="stable")])
        elif criterion == "frequency":
            orders.append([int(e) for e in np.argsort(-np.asarray(counts[i]), kind="stable")])
        elif criterion == "random":
            orders.append([int(e) for e in rng.permutation(E)])
        elif criterion == "uniform":
            orders.append(list(range(E)))
        else:
            raise ConfigError(f"moe_allocation = {requested!r} is not known.")
    if criterion == "uniform":
        if avg not in ws:
            raise ConfigError(f"uniform allocation at {avg} bits needs {avg} among the widths {ws}.")
        bits = [[int(avg)] * E for _ in moe.blocks]
    else:
        n = width_counts(E, avg, ws)
        per_rank = [b for b in sorted(n, reverse=True) for _ in range(n[b])]  # rank 0 = most bits
        bits = []
        for order in orders:
            row = [0] * E
            for rank, e in enumerate(order):
                row[e] = per_rank[rank]
            bits.append(row)
    return Allocation(requested, criterion, float(avg), ws, bits, [b.layer for b in moe.blocks], fallback,
                      scores, orders, zeta, seed, history_meta)


def plan_for_recipe(model, moe, recipe, gate_history: str, model_path: str, calib_ids: np.ndarray,
                    say=None) -> Allocation:
    """The build's allocation for one ``moe_bits`` recipe (history looked up, counts if needed)."""
    path = history_path(gate_history, model_path)
    if gate_history and not path.is_file():
        raise ConfigError(f"[model] gate_history = {gate_history!r} does not exist (leave it empty to look for "
                          "moe_gate_history.safetensors beside the model, else fall back to max intra-neuron variance).")
    history, reason = load_gate_history(path, moe)
    meta = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()} if history else None
    counts = routing_stats(model, moe, calib_ids).counts if recipe.moe_allocation == "frequency" else None
    return allocate(moe, recipe.moe_allocation, recipe.moe_bits, recipe.moe_widths, history=history,
                    history_reason=reason, counts=counts, zeta=recipe.moe_zeta, seed=recipe.moe_seed,
                    history_meta=meta, say=say)


# ---------------------------------------------------------------- the ONNX path (build)

def quantize_moe_onnx(fp_onnx: Path, recipe, out: Path, calib_feeds: list[dict], moe, alloc: Allocation) -> dict:
    """Every routed expert's MatMuls as MatMulNBits at its allocated width, every other
    constant-weight MatMul at ``recipe.bits``, the gates FP: one ``quantize_onnx`` pass per
    width (ORT's RTN or our GPTQ), each excluding the MatMuls not at that width. Our GPTQ's
    Hessians come from the dense export graph: every token reaches every expert's MatMul (the
    routing weight is applied after it), so they are over all calibration tokens, not only
    the routed ones (the torch path uses the routed ones)."""
    import onnx

    from moqe_compile.quantize.nbits import const_matmuls, lm_head_node
    from moqe_compile.tasks.causal_lm.experts import quantize_onnx
    from moqe_compile.tasks.causal_lm.moe import onnx_moe_nodes

    m = onnx.load(str(fp_onnx), load_external_data=False)
    where = onnx_moe_nodes(m, moe)
    nodes, inits = const_matmuls(m, set())
    const = [n.name for n in nodes]
    numel = {n.name: int(np.prod(inits[n.input[1]].dims)) for n in nodes}
    del m
    gates = set(where["gates"])
    width = {node: alloc.bits[i][e] for (i, e), mats in where["experts"].items() for node in mats.values()}
    for n in const:
        if n not in width and n not in gates:
            width[n] = recipe.bits
    groups: dict[int, list[str]] = {}
    for n, b in width.items():
        groups.setdefault(b, []).append(n)
    src = Path(fp_onnx)
    with tempfile.TemporaryDirectory(prefix="moqe-moe-bits-") as tmp:
        for k, b in enumerate(sorted(groups)):
            dst = out if k == len(groups) - 1 else Path(tmp) / f"w{b}.onnx"
            r = copy.copy(recipe)  # no re-validation: 2-bit RTN is a valid expert width, not a recipe bits
            r.bits = b
            keep = set(groups[b])
            quantize_onnx(src, r, dst, calib_feeds, exclude_nodes=[n for n in const if n not in keep])
            src = dst
    head = lm_head_node(fp_onnx)
    bits_of = {n: (32 if n in gates else recipe.head_bits if n == head else width[n]) for n in const}
    mean_w = sum(numel[n] * b for n, b in bits_of.items()) / max(1, sum(numel.values()))
    return {"gate_nodes": sorted(gates), "matmuls_per_width": {str(b): len(v) for b, v in sorted(groups.items())},
            "non_expert_bits": recipe.bits, "mean_weight_bits": round(mean_w, 4)}


# ---------------------------------------------------------------- the torch path (bench grid)

class ExpertFakeQuant:
    """Fake-quantized copies of every routed expert matrix, cached per width, written into the
    model's fused expert tensors on :meth:`apply` and put back on :meth:`restore`.

    ``method``: ``"rtn"`` (quantize/nbits.py's blockwise RTN) or ``"gptq"`` (quantize/gptq.py,
    Hessians of the tokens routed to the expert from :func:`routing_stats`); ``symmetric`` True:
    2^b − 1 levels around 0 per group, False: 2^b levels with a zero point per group."""

    def __init__(self, moe, method: str = "gptq", group: int = 32, symmetric: bool = True, damp: float = 0.01,
                 stats: RoutingStats | None = None):
        if method not in ("rtn", "gptq"):
            raise ConfigError(f"method {method!r} is not 'rtn' or 'gptq'.")
        if method == "gptq" and (stats is None or stats.h_in is None):
            raise ConfigError("GPTQ needs routing_stats(..., hessians=True).")
        self.moe, self.method, self.group, self.symmetric, self.damp, self.stats = moe, method, group, symmetric, damp, stats
        self.orig = [[{k: v.clone() for k, v in b.expert(e).items()} for e in range(b.num_experts)] for b in moe.blocks]
        self.cache: dict = {}

    def matrix(self, i: int, e: int, m: str, bits: int):
        key = (i, e, m, bits)
        if key not in self.cache:
            self.cache[key] = self._quantize(self.orig[i][e][m], bits, i, e, m)
        return self.cache[key]

    def _quantize(self, w, bits: int, i: int, e: int, m: str):
        import torch

        from moqe_compile.quantize.gptq import gptq_blockwise
        from moqe_compile.quantize.nbits import rtn_blockwise

        if self.method == "rtn":
            return rtn_blockwise(w.float(), bits, self.group, self.symmetric)
        H = (self.stats.h_mid if m == "down_proj" else self.stats.h_in)[i][e]
        N, K = w.shape
        pad = (-K) % self.group
        if H is None:  # never routed on calibration: no Hessian, RTN-equivalent (identity)
            H = np.eye(K)
        H = np.asarray(H, np.float64)
        W = w.double().numpy()
        if pad:
            W = np.pad(W, ((0, 0), (0, pad)))
            H = np.pad(H, ((0, pad), (0, pad)))
            H[K:, K:] = np.eye(pad)
        res = gptq_blockwise(W, H, bits, self.group, self.damp, symmetric=self.symmetric)
        q, s = res[0].astype(np.float32), np.repeat(res[1], self.group, axis=1)
        z = res[2] if len(res) > 2 and res[2] is not None else None  # asymmetric: codes offset by a zero point
        deq = (q - (0 if z is None else np.repeat(z, self.group, axis=1))) * s
        return torch.from_numpy(np.ascontiguousarray(deq[:, :K], dtype=np.float32))

    def apply(self, table) -> None:
        """``table[i][e]``: an int width, or a float between two widths (the uniform control at
        a fractional mean): that share of each matrix's output rows at the upper width."""
        for i, b in enumerate(self.moe.blocks):
            for e in range(b.num_experts):
                bits = table[i][e]
                for m, dst in b.expert(e).items():
                    dst.copy_(self._rows(i, e, m, bits))

    def _rows(self, i, e, m, bits):
        if float(bits).is_integer():
            return self.matrix(i, e, m, int(bits))
        lo, hi = int(np.floor(bits)), int(np.ceil(bits))
        w = self.matrix(i, e, m, lo).clone()
        n_hi = int(round((bits - lo) * w.shape[0]))
        w[:n_hi] = self.matrix(i, e, m, hi)[:n_hi]
        return w

    def restore(self) -> None:
        for i, b in enumerate(self.moe.blocks):
            for e in range(b.num_experts):
                for m, dst in b.expert(e).items():
                    dst.copy_(self.orig[i][e][m])


def expert_bytes(moe, table, group: int = 32, symmetric: bool = True) -> float:
    """Bytes of the routed expert weights at the widths of ``table`` (codes + an fp16 scale per
    group, + a zero point of the same width per group when asymmetric)."""
    total = 0.0
    for i, b in enumerate(moe.blocks):
        per_expert = 3 * b.hidden * b.intermediate
        groups = per_expert / group
        for e in range(b.num_experts):
            bits = float(table[i][e])
            total += per_expert * bits / 8 + groups * 2 + (0 if symmetric else groups * bits / 8)
    return total


def build_moe_expert(model, moe, recipe, model_cfg, calib_ids: np.ndarray, src: Path, dest: Path,
                     calib_feeds: list[dict], say=None) -> dict:
    """The build's hook for a ``moe_bits`` recipe: allocate, quantize, and the manifest record."""
    if moe is None:
        raise BuildError(f"expert {recipe.name!r} sets moe_bits, but the model has no sparse MoE blocks "
                         "(tasks/causal_lm/moe.py: Mixtral / Qwen2-MoE / OLMoE layouts).")
    alloc = plan_for_recipe(model, moe, recipe, model_cfg.gate_history, model_cfg.path, calib_ids, say)
    rec = alloc.to_manifest()
    rec.update(quantize_moe_onnx(src, recipe, dest, calib_feeds, moe, alloc))
    fp32 = 4.0 * moe.expert_params()
    rec["expert_weight_bytes"] = {"allocated": round(expert_bytes(moe, alloc.bits, recipe.block_size)), "fp32": fp32}
    if say:
        say(f"{recipe.name}: {alloc.criterion} allocation, mean {alloc.mean_bits:.3f} bits over experts "
            f"(target {alloc.target_bits}), widths {alloc.widths}")
    return rec
