"""encoder.onnx: an exported encoder as ONNX, for runtimes without torch (onnxruntime, ...).

Written by the workers at finalize, next to encoder.pt, so the API only serves a file: it
never imports torch to convert one.
"""

import io

import torch
from torch import nn

from workers.export_lock import EXPORTING

INPUT, OUTPUT = "x", "codes"
# Every operator our encoders use (Gemm, Conv, Reshape, the activations; GELU as Erf) is in
# opset 13; 17 is read by every onnxruntime since 1.13 (2022) and by the other runtimes.
OPSET = 17


def onnx_bytes(module: nn.Module, input_dim: int) -> bytes:
    """`module` ((B, input_dim) raw features -> (B, K) codes) as an ONNX model whose batch
    dimension is dynamic (`batch`); its input is `x`, its output `codes`, both float32."""
    # Two rows, not one: a size-1 dimension is one the tracer might fold into a constant.
    example = torch.zeros(2, input_dim)
    buffer = io.BytesIO()
    with EXPORTING, torch.no_grad():
        # dynamo=False: the TorchScript-based exporter (deprecated since torch 2.9, still in
        # 2.13) needs only `onnx`. Measured on the digits-dense example, 2 cores: 0.03-0.04 s
        # of a 0.7 s finalize (0.2-0.6 s for the first export in a process, its imports); the
        # dynamo exporter needs onnxscript too and takes 1.5 s (11 s for the first). Its
        # DeprecationWarning shows only in __main__; when it is gone: dynamo=True with
        # dynamic_shapes.
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
        )
    return buffer.getvalue()
