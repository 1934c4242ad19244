"""One image expert, end to end: (equalize) -> calibrate -> weights -> Q/DQ per backend ->
(sequential pass | bias correction) -> checked. Every step is a field of :class:`ExpertRecipe`;
this module translates the recipe into the plain parameters of the ``quantize`` passes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from moqe_compile.errors import BuildError
from moqe_compile.tasks.image.presets import STRONGEST_PRESETS
from moqe_compile.quantize.adaround import adaround_layer
from moqe_compile.quantize.brecq import BlockSettings
from moqe_compile.quantize.calibrate import calibrate_ranges
from moqe_compile.quantize.check import check_qdq
from moqe_compile.quantize.equalize import equalize
from moqe_compile.quantize.graph import get_init, run_with_outputs, set_init, weight_layers
from moqe_compile.quantize.qdq import VARIANTS, reduce_range_for, write_expert
from moqe_compile.quantize.sequential import correct_bias, refine
from moqe_compile.quantize.weights import channel_scales, dequantize, overrides_for, qmax_for, quantize_nearest
from moqe_compile.stages import peak_window
from moqe_compile.tasks.image.config import BuildConfig, ExpertRecipe


def end_layers(model: onnx.ModelProto) -> list[str]:
    """The first and the last Conv/Gemm node: the layers low-bit post-training quantization
    conventionally keeps at 8 bits (the image stem sees raw pixels, the classifier the logits)."""
    names = [l.node for l in weight_layers(model)]
    return sorted({names[0], names[-1]}) if names else []


def high_precision(model: onnx.ModelProto, recipe: ExpertRecipe) -> list[str]:
    """The nodes whose weights ``recipe`` keeps at 8 bits: its high_precision_nodes, plus the
    first and last layer with high_precision_ends."""
    keep = set(recipe.high_precision_nodes) | (set(end_layers(model)) if recipe.high_precision_ends else set())
    return sorted(keep)


def node_qmax(model: onnx.ModelProto, recipe: ExpertRecipe, backend: str) -> dict[str, int]:
    """Weight grid per Conv/Gemm node: the recipe's bits, 8 for its high-precision nodes."""
    rr = reduce_range_for(backend)
    unknown = set(recipe.high_precision_nodes) - {l.node for l in weight_layers(model)}
    if unknown:
        raise BuildError(f"expert {recipe.name!r}: high_precision_nodes {sorted(unknown)} are not Conv/Gemm nodes "
                         "of the model (see `moqe-compile sensitivity` for the node names).")
    keep = set(high_precision(model, recipe))
    return {l.node: qmax_for(8 if l.node in keep else recipe.weight_bits, rr) for l in weight_layers(model)}


def _weights(model: onnx.ModelProto, recipe: ExpertRecipe, backend: str, exclude: set[str], input_name: str,
             calib_x: np.ndarray) -> dict:
    """Put our integer weights (as s*q) into ``model``; return ORT overrides with the scales."""
    qmaxes = node_qmax(model, recipe, backend)
    layers = [l for l in weight_layers(model) if l.node not in exclude]
    inputs = {}
    if recipe.weight_rounding == "adaround":
        xs = calib_x[: min(len(calib_x), 32)]
        got = run_with_outputs(model, sorted({l.input for l in layers}), input_name, xs)
        inputs = {k: np.concatenate(v) for k, v in got.items()}
    overrides = {}
    for l in layers:
        w = get_init(model, l.weight)
        qmax = qmaxes[l.node]
        # mse-output picks its clip later, jointly with GPTQ (sequential.py); start from the MSE clip.
        s = channel_scales(w, qmax, "mse" if recipe.weight_clip == "mse-output" else recipe.weight_clip)
        if recipe.weight_rounding == "adaround":
            b = get_init(model, l.bias) if l.bias else None
            q = adaround_layer(l.op, l.attrs, w, b, s, qmax, inputs[l.input], iters=recipe.adaround_iters)
        else:
            q = quantize_nearest(w, s, qmax)
        set_init(model, l.weight, dequantize(q, s))
        overrides[l.weight] = overrides_for(s)
    return overrides


def _bias_correct(base: onnx.ModelProto, q_path: Path, exclude: set[str], input_name: str, x: np.ndarray) -> int:
    """Empirical bias correction, layer by layer in graph order, on the quantized stream.

    For each layer, E[y_fp - y_q] per output channel (pre-activation, calibration data, the
    layers before it already corrected) is added to its bias inside the Q/DQ graph. Sequential
    on purpose: correcting every layer from one uncorrected pass over-corrects downstream
    layers (docs/results.md#expert-recipes). Layers without a bias input are skipped.
    """
    q = onnx.load(str(q_path))
    qnodes = {n.name: n for n in q.graph.node}
    layers = [l for l in weight_layers(base) if l.node not in exclude and l.node in qnodes
              and len(qnodes[l.node].input) > 2 and qnodes[l.node].input[2]]
    fp = run_with_outputs(base, [l.output for l in layers], input_name, x)
    inits = {i.name: i for i in q.graph.initializer}
    for l in layers:
        node = qnodes[l.node]
        got = run_with_outputs(q, [node.output[0]], input_name, x)
        correct_bias(q, inits, node, np.concatenate(fp[l.output]), np.concatenate(got[node.output[0]]))
    onnx.save(q, str(q_path))
    return len(layers)


def _sequential(base: onnx.ModelProto, q_path: Path, recipe: ExpertRecipe, backend: str, exclude: set[str],
                input_name: str, calib_x: np.ndarray, progress: bool) -> dict:
    """The recipe's sequential pass (``quantize/sequential.py``) on one backend's Q/DQ graph."""
    blocks = (BlockSettings(iters=recipe.block_iters, samples=recipe.block_samples, qdrop=recipe.qdrop,
                            early_stop=recipe.block_early_stop, layers=recipe.block_layers)
              if recipe.weight_rounding == "brecq" else None)
    return refine(base, q_path, node_qmax(base, recipe, backend), VARIANTS[backend][2] or recipe.symmetric_activations,
                  exclude, input_name, calib_x[: min(len(calib_x), recipe.stream_samples)],
                  refit_activations=recipe.sequential_activations, gptq=recipe.weight_rounding == "gptq",
                  clip_search=recipe.weight_clip == "mse-output", gptq_damp=recipe.gptq_damp,
                  bias_correction=recipe.bias_correction, blocks=blocks, progress=progress)


def build_expert(prepared: Path, input_name: str, calib_x: np.ndarray, recipe: ExpertRecipe, backends: list[str],
                 out_for: dict[str, Path], ranges_json: Path, work: Path, exclude: list[str] | None = None,
                 progress: bool = True) -> dict:
    """Write every backend's graph of ``recipe``; return its manifest info per backend + steps
    (seconds per step, ``total_s`` and the expert's ``peak_rss_mb``). ``progress``: the inner
    passes' progress bars shown (``build -q`` hides them)."""
    with peak_window() as peak:
        built = _build_expert(prepared, input_name, calib_x, recipe, backends, out_for, ranges_json, work, exclude,
                              progress)
    built["steps"]["peak_rss_mb"] = peak["peak_rss_mb"]
    return built


def _build_expert(prepared: Path, input_name: str, calib_x: np.ndarray, recipe: ExpertRecipe, backends: list[str],
                  out_for: dict[str, Path], ranges_json: Path, work: Path, exclude: list[str] | None,
                  progress: bool) -> dict:
    t0 = time.perf_counter()
    exclude_set = set(exclude or []) | set(recipe.exclude_nodes)
    base = onnx.load(str(prepared))
    steps: dict = {}
    if recipe.equalization:
        steps["equalized_pairs"] = equalize(base)
    base_path = work / f"{recipe.name}.base.onnx"
    onnx.save(base, str(base_path))
    calibrate_ranges(base_path, input_name, calib_x, ranges_json, method=recipe.calibration,
                     symmetric=recipe.symmetric_activations, num_bins=recipe.num_bins, percentile=recipe.percentile)
    steps["calibration_s"] = round(time.perf_counter() - t0, 2)
    variants = {}
    for backend in backends:
        model = onnx.ModelProto.FromString(base.SerializeToString())
        overrides = (_weights(model, recipe, backend, exclude_set, input_name, calib_x)
                     if recipe.custom_weights else {})
        wpath = work / f"{recipe.name}.{backend}.weights.onnx"
        onnx.save(model, str(wpath))
        info = write_expert(wpath, ranges_json, backend, out_for[backend], method=recipe.calibration,
                            symmetric_activations=recipe.symmetric_activations, per_channel=recipe.per_channel,
                            weight_bits=recipe.weight_bits, weight_overrides=overrides, exclude=sorted(exclude_set))
        if recipe.sequential:
            t1 = time.perf_counter()
            steps.update(_sequential(base, out_for[backend], recipe, backend, exclude_set, input_name, calib_x,
                                     progress))
            steps[f"sequential_s.{backend}"] = round(time.perf_counter() - t1, 2)
        elif recipe.bias_correction:
            steps["bias_corrected_layers"] = _bias_correct(base, out_for[backend], exclude_set, input_name,
                                                           calib_x[: min(len(calib_x), 128)])
        info["check"] = check_qdq(out_for[backend], backend, allow_float=len(exclude_set))
        if not info["check"]["ok"]:
            raise BuildError(f"expert {recipe.name!r} ({backend}) fails check-qdq: {info['check']['violations'][:5]}")
        variants[backend] = info
    steps["total_s"] = round(time.perf_counter() - t0, 2)
    return {"variants": variants, "steps": steps}


def strongest_expert(experts: list[ExpertRecipe]) -> str | None:
    """The first expert built from a strongest preset (the baseline every report measures)."""
    return next((r.name for r in experts if r.preset in STRONGEST_PRESETS), None)


def copy_recipe(cfg: BuildConfig) -> ExpertRecipe:
    """The recipe the copies repeat: ``[controls] copies_of``'s, else the strongest expert's,
    else the ``strongest`` preset at the first expert's weight width."""
    name = cfg.controls.copies_of or strongest_expert(cfg.experts)
    if name is not None:
        return next(r for r in cfg.experts if r.name == name)
    preset = "w4a8-strongest" if cfg.experts[0].weight_bits == 4 else "strongest"
    return ExpertRecipe.from_preset("copy", preset)


def expert_cost(prepared: Path, excluded: list[str], weight_bits: int, high_precision: list[str] = (),
                ends: bool = False) -> float:
    """Mean weight bits per Conv/Gemm weight parameter; FP-kept layers count 32, layers kept
    at 8 bits (``high_precision``, and with ``ends`` the first and last layer) 8."""
    m = onnx.load(str(prepared))
    if ends:  # the recipe allows it only below 8 bits
        high_precision = [*high_precision, *end_layers(m)]
    sizes = {i.name: int(np.prod(i.dims)) for i in m.graph.initializer}
    total = bits = 0
    for l in weight_layers(m):
        n = sizes[l.weight]
        total += n
        bits += n * (32 if l.node in excluded else 8 if l.node in high_precision else weight_bits)
    return float(bits / total) if total else float(weight_bits)
