"""Generic Triton python-backend model: serves one ONNX file with onnxruntime on CPU.

``wlcad triton`` copies this file next to each model's ``model.onnx`` in a generated twin of the
repository, because the Triton build available without Docker (inside the nvidia-pytriton wheel)
has only the python backend. The twin keeps the tensor names, dims, ``max_batch_size`` and
``dynamic_batching`` of the real config, so clients see the same server; in production NGC Triton
serves the real repository with its native onnxruntime backend instead. Standalone on purpose: it
runs inside Triton's stub process, which has numpy and onnxruntime but not wlcad.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One onnxruntime session; a batch of Triton requests runs as one onnxruntime call."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0")
        options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        shapes = {
            tuple((name, feed[name].shape[1:], feed[name].dtype.str) for name in self.input_names)
            for feed in feeds
        }
        if self.batching and len(feeds) > 1 and len(shapes) == 1:
            return self._run_stacked(feeds)
        return [self._respond(lambda feed=feed: self.session.run(self.output_names, feed)) for feed in feeds]

    def _run_stacked(self, feeds):
        """Dynamic batching: Triton handed us several requests; stack, run once, split."""
        stacked = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.input_names}
        try:
            results = self.session.run(self.output_names, stacked)
        except Exception as exc:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))) for _ in feeds]
        responses, start = [], 0
        for feed in feeds:
            stop = start + feed[self.input_names[0]].shape[0]
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[start:stop]))
                for name, result in zip(self.output_names, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses

    def _respond(self, run):
        try:
            results = run()
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(r))
            for name, r in zip(self.output_names, results, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
