"""One lock for torch's exporters in a process: a dispatcher finalizes its jobs in threads.

Both exporters keep module globals. Two jobs finalized at once failed with "in_onnx_export
must be True" (the ONNX exporter), and with "Can't redefine method: forward on class" when
two threads compiled the same class for TorchScript the first time (tests/workers/
test_onnx_export.py reproduces both with eight threads).
"""

import threading

import torch
from torch import nn

EXPORTING = threading.Lock()


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script of `module` in eval mode, one thread at a time."""
    with EXPORTING:
        scripted: torch.jit.ScriptModule = torch.jit.script(module.eval())
    return scripted
