"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization"), ours: ORT has none.

For Conv1 -> ReLU -> Conv2 where Conv1's output feeds only the ReLU and the ReLU only Conv2,
scaling output channel i of Conv1 by 1/s_i and input channel i of Conv2 by s_i leaves the
function unchanged (ReLU is positively homogeneous) and with s_i = sqrt(r1_i / r2_i) equalizes
the per-channel weight ranges, which helps per-tensor and low-bit weights. Clip (ReLU6) is
not homogeneous, so such pairs (MobileNetV2) are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx

from moqe_compile.quantize.graph import get_init, set_init, weight_layers


def equalize(model: onnx.ModelProto, iterations: int = 3) -> int:
    """Equalize in place; returns the number of layer pairs equalized."""
    layers = {l.node: l for l in weight_layers(model) if l.op == "Conv"}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for l1 in layers.values():
        c1 = consumers.get(l1.output, [])
        if len(c1) != 1 or c1[0].op_type != "Relu" or l1.output in outputs:
            continue
        c2 = consumers.get(c1[0].output[0], [])
        if len(c2) != 1 or c2[0].name not in layers or c1[0].output[0] in outputs:
            continue
        l2 = layers[c2[0].name]
        if l2.attrs.get("group", 1) != 1 or l1.attrs.get("group", 1) != 1:
            continue  # depthwise pairs need per-group handling; skipped
        pairs.append((l1, l2))
    for _ in range(iterations):
        for l1, l2 in pairs:
            w1, w2 = get_init(model, l1.weight), get_init(model, l2.weight)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(1)
            r2 = np.abs(w2.transpose(1, 0, 2, 3).reshape(w2.shape[1], -1)).max(1)
            s = np.sqrt(np.maximum(r1, 1e-8) / np.maximum(r2, 1e-8))
            set_init(model, l1.weight, w1 / s[:, None, None, None])
            if l1.bias:
                set_init(model, l1.bias, get_init(model, l1.bias) / s)
            set_init(model, l2.weight, w2 * s[None, :, None, None])
    return len(pairs)
