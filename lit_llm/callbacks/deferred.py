"""Reading a small result of GPU work later, without making the host wait for the GPU when it is computed.

``tensor.item()`` or ``.tolist()`` on a CUDA tensor makes the host wait until every kernel queued so far has run; the
GPU then idles while the host prepares the next kernels. A training loop that reads a flag (a SIGTERM agreement, a
finite-loss verdict) at every step loses that time at every step. :class:`DeferredRead` queues the copy of the flag
to pinned host memory behind a CUDA event instead, and reads it later (a batch or a step on), when the event has
long passed: the wait then covers only the GPU work queued before the copy.
"""

from __future__ import annotations

from typing import Any

import torch


class DeferredRead:
    """One small tensor at a time, copied to host memory where it is computed and read later.

    :meth:`launch` queues the copy (into a pinned buffer reused across launches, with a CUDA event after it); on the
    CPU it keeps a copy of the tensor. :meth:`read` waits for that event only and returns the host tensor, or ``None``
    when nothing was launched since the last read. Each launch must be read before the next one (the buffer is reused).
    """

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._event: Any = None
        self.pending = False

    def launch(self, tensor: torch.Tensor) -> None:
        if self.pending:
            raise RuntimeError("DeferredRead.launch: the previous launch was not read; its buffer would be overwritten")
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            if self._host is None or self._host.shape != tensor.shape or self._host.dtype != tensor.dtype:
                self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(tensor, non_blocking=True)
            self._event.record()
        else:
            self._host, self._event = tensor.clone(), None
        self.pending = True

    def read(self) -> torch.Tensor | None:
        """The last launched tensor on the host (waiting only for the GPU work queued before its launch), or ``None``
        when it was read already."""
        if not self.pending:
            return None
        if self._event is not None:
            self._event.synchronize()
        self.pending = False
        return self._host
