"""MoQE router + experts as one Triton model: a Python-backend BLS (business logic
scripting) model written by ``moqe-compile export-triton``.

Per ``execute`` call it merges every request Triton hands it (Triton's dynamic batcher
groups them), runs the router model once, groups the samples per chosen expert with
``moqe_dispatch`` (the moqe_compile runtime's own file, copied beside this one), issues
one asynchronous BLS request per expert, and scatters the results back per request.

Model parameters (config.pbtxt, written by the exporter): ``moqe`` holds JSON with the
router model name (or null when the bundle serves one expert), the expert model names
in the bundle's order, and the fallback rule.
"""

import asyncio
import importlib.util
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _load_sibling(name):
    # Triton loads model.py by path; load the copied runtime files the same way instead of
    # relying on the backend's sys.path.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_dispatch = _load_sibling("moqe_dispatch")
_fallback = _load_sibling("moqe_fallback")


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = json.loads(cfg["parameters"]["moqe"]["string_value"])
        self.router = p["router_model"]
        self.router_output = p["router_output"]
        self.experts = p["expert_models"]
        self.expert_names = p["expert_names"]
        self.default_expert = int(p["default_expert"])
        self.threshold = float(p["fallback_threshold"])
        self.fallback = int(p["fallback_expert"])
        self.input_name = p["input_name"]
        self.output_name = p["output_name"]

    async def _run(self, model, inputs, output):
        req = pb_utils.InferenceRequest(model_name=model, requested_output_names=[output], inputs=inputs)
        resp = await req.async_exec()
        if resp.has_error():
            raise pb_utils.TritonModelException(f"{model}: {resp.error().message()}")
        return pb_utils.get_output_tensor_by_name(resp, output).as_numpy()

    async def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
        x = np.ascontiguousarray(np.concatenate(xs) if len(xs) > 1 else xs[0], dtype=np.float32)
        if self.router is None:
            idx, conf = np.full(len(x), self.default_expert), np.ones(len(x), np.float32)
        else:
            probs = await self._run(self.router, [pb_utils.Tensor(self.input_name, x)], self.router_output)
            idx, conf = _fallback.apply_fallback(probs, self.threshold, self.fallback)
        groups = _dispatch.group_by_expert(idx)
        outs = await asyncio.gather(*[
            self._run(self.experts[k], [pb_utils.Tensor(self.input_name, np.ascontiguousarray(x[m]))],
                      self.output_name) for k, m in groups])
        logits = _dispatch.scatter(groups, outs, len(x))
        names = np.array([self.expert_names[k].encode() for k in idx], dtype=np.object_)
        responses = []
        for r, sl in zip(requests, _dispatch.split_requests([len(a) for a in xs])):
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("logits", logits[sl]),
                pb_utils.Tensor("expert", idx[sl].astype(np.int32).reshape(-1, 1)),
                pb_utils.Tensor("expert_name", names[sl].reshape(-1, 1)),
                pb_utils.Tensor("router_confidence", conf[sl].astype(np.float32).reshape(-1, 1)),
            ]))
        return responses
