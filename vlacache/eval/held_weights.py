"""Run a model whose weights are held in bfloat16 with float32 arithmetic, one weight matrix at a time.

For the real-size CPU benchmarks: a 7B model's float32 weights (30 GB) do not fit a 24 GiB machine, and a CPU
without bfloat16 matrix units multiplies bfloat16 hundreds of times slower than float32. Held here, each linear
and convolution weight stays in bfloat16 and is copied into one reusable float32 buffer just before its module
runs; embeddings look up in bfloat16 and hand on float32 rows (the same values); every other parameter (norms,
biases, tokens) becomes float32 for good. The arithmetic is then exactly that of the float32 model loaded from the
same bfloat16 weights. What the copies cost is counted (`seconds`, `copies`), so a benchmark can report it apart.
"""

from __future__ import annotations

import time

import torch
from torch import nn

HELD = (nn.Linear, nn.Conv2d)


class HeldWeights:
    """Hold the matrix weights of `modules` in bfloat16 and run them in float32 (see the module docstring).
    `release()` removes the hooks (the weights stay as held)."""

    def __init__(self, *modules: nn.Module) -> None:
        self.seconds = 0.0
        self.copies = 0
        self._handles = []
        largest = 0
        for root in modules:
            for module in root.modules():
                held = isinstance(module, HELD) and module.weight.dtype == torch.bfloat16
                for name, param in module.named_parameters(recurse=False):
                    if not (held and name == "weight") and param.dtype != torch.float32:
                        param.data = param.data.float()
                for name, buffer in module.named_buffers(recurse=False):
                    if buffer.is_floating_point() and buffer.dtype != torch.float32:
                        setattr(module, name, buffer.float())
                if held:
                    largest = max(largest, module.weight.numel())
                    self._handles += [module.register_forward_pre_hook(self._before),
                                      module.register_forward_hook(self._after)]
                elif isinstance(module, nn.Embedding) and module.weight.dtype == torch.bfloat16:
                    self._handles.append(module.register_forward_hook(_rows_in_float32))
        self._scratch = torch.empty(largest, dtype=torch.float32)
        self._held: dict[nn.Module, torch.Tensor] = {}

    def _before(self, module: nn.Module, args) -> None:
        start = time.perf_counter()
        weight = module.weight.data
        module.weight.data = self._scratch[: weight.numel()].view(weight.shape).copy_(weight)
        self._held[module] = weight
        self.seconds += time.perf_counter() - start
        self.copies += 1

    def _after(self, module: nn.Module, args, output) -> None:
        module.weight.data = self._held.pop(module)

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _rows_in_float32(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()
