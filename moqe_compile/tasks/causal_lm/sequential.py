"""True-sequential GPTQ on a Llama-style decoder (Frantar et al. 2023, as their code and
AutoGPTQ / GPTQModel run it): layer by layer, and within a layer q/k/v, then o, then gate/up,
then down, each on the inputs of the *already quantized* model so far.

The one-pass ONNX path (``quantize/gptq.py``, :func:`collect_hessians`) takes every Hessian from
the FP graph in one run per calibration window. Doing true-sequential on the ONNX graph would
need one pass over the calibration set per sub-layer stage (120 for a 30-layer model, what ORT's
GPTQ does), so it runs here on the torch model instead: the inputs of layer 0 are captured
once, each layer is run on them once per stage (4, each run cut short once the stage's inputs
are seen) and once more to give the next layer's inputs, i.e. about two and a quarter forward
passes of the calibration set in all. The codes land in the
ONNX graph through the node whose weight is the module's (matched by value), so the graph
written is the one-pass path's layout.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np

from moqe_compile.errors import BuildError

STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _key(w_kn: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w_kn, dtype=np.float32).tobytes()).hexdigest()


def _onnx_nodes_by_weight(fp_onnx, exclude) -> dict[str, str]:
    import onnx
    from onnx import numpy_helper

    from moqe_compile.quantize.nbits import const_matmuls

    nodes, inits = const_matmuls(onnx.load(str(fp_onnx)), set(exclude))
    return {_key(numpy_helper.to_array(inits[n.input[1]])): n.name for n in nodes}


class _Stop(Exception):
    pass


def _layer_inputs(model, calib_ids: np.ndarray) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of decoder layer 0 per calibration window."""
    import torch

    got = []

    def grab(_mod, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    h = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in calib_ids:
                try:
                    model(input_ids=torch.from_numpy(np.asarray(row)[None]), use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    return got


def _run(layer, inputs):
    import torch

    outs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = layer(*args, **kwargs)
            outs.append((((y[0] if isinstance(y, tuple) else y),) + tuple(args[1:]), kwargs))
    return outs


def _hessians(layer, modules: dict, inputs) -> dict:
    """Input Hessians of ``modules`` ({name: nn.Linear}) over ``layer`` run on ``inputs``.

    The modules of a stage read one tensor in a Llama-style layer (q/k/v the attention norm's
    output, gate/up the MLP norm's), so the first module's input gives every module's Hessian,
    and each window's run stops there: the rest of the layer (all of the MLP for q/k/v and o)
    does not change it, and running it anyway made the stages cost four full layer passes
    instead of about one and a quarter."""
    import torch

    from moqe_compile.quantize.gptq import Hessian

    first = next(iter(modules.values()))
    hess = Hessian(first.in_features)

    def hook(_mod, inp):
        hess.add_rows(inp[0].detach().reshape(-1, inp[0].shape[-1]).double()[:, None, :])
        raise _Stop

    h = first.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                try:
                    layer(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        h.remove()
    H = hess.mean()[0].numpy()
    return dict.fromkeys(modules, H)


def sequential_gptq(model, calib_ids: np.ndarray, fp_onnx, bits: int, group: int, damp: float, symmetric: bool,
                    act_order: bool, head_bits: int | None, exclude=(), progress: bool = True) -> dict:
    """{ONNX node name: ``gptq_matrix`` result} for every decoder-layer projection and, when
    ``head_bits`` is 4 or 8, the LM head (on the quantized model's final hidden states)."""
    import torch

    from moqe_compile.quantize.gptq import Hessian, gptq_matrix

    by_weight = _onnx_nodes_by_weight(fp_onnx, exclude)
    model = copy.deepcopy(model)
    try:
        layers, norm, head = model.model.layers, model.model.norm, model.lm_head
    except AttributeError as e:
        raise BuildError(f"true-sequential GPTQ knows the Llama-style layout (model.layers[i].self_attn / mlp, "
                         f"model.norm, lm_head); this model differs: {e}.") from e
    done: dict = {}

    def quantize(module, b: int, H: np.ndarray) -> None:
        w = module.weight.detach().numpy().T
        name = by_weight.get(_key(w))
        if name is None:
            raise BuildError("true-sequential GPTQ: no MatMul of the exported graph holds this projection's weight "
                             "(was the graph exported from another model?).")
        res = gptq_matrix(np.ascontiguousarray(w), H, b, group, damp, symmetric, act_order)
        done[name] = res
        module.weight.data = torch.from_numpy(np.ascontiguousarray(res[3].T))

    from tqdm.auto import tqdm

    inputs = _layer_inputs(model, calib_ids)
    for layer in tqdm(layers, desc="true-sequential GPTQ, layers", leave=False, disable=None if progress else True):
        for stage in STAGES:
            modules = {n: layer.get_submodule(n) for n in stage}
            H = _hessians(layer, modules, inputs)
            for module_name, module in modules.items():
                quantize(module, bits, H[module_name])
        inputs = _run(layer, inputs)
    if head_bits in (4, 8):
        acc = Hessian(head.in_features)
        with torch.no_grad():
            for args, _ in inputs:
                t = norm(args[0])
                acc.add_rows(t.reshape(-1, t.shape[-1]).double()[:, None, :])
        quantize(head, head_bits, acc.mean()[0].numpy())
    return done
