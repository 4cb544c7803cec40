"""`PackedTernaryLinear`: an inference-only drop-in for `nn.Linear` whose weights stay 2-bit packed.

`y = (x @ codes.T) * scale + bias` with codes in {-1, 0, 1} stored in `encoder.packing`'s layout and run by
the native kernel (`encoder.kernel`). No float copy of the weight is ever kept: the module holds the packed
bytes (N_pad * K_pad / 4), one float32 scale per output row and the optional float32 bias. Used by the torch
reference forward (encoder/ternary_torch.py) and bench.kernel; the native encoder calls the kernel from C.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from encoder import kernel
from encoder.packing import pack_ternary, packed_nbytes

_gemm = kernel.gemm_raw if kernel._tq2k is None else kernel._tq2k.gemm  # direct C call: no wrapper frame


class PackedTernaryLinear(nn.Module):
    def __init__(self, packed: np.ndarray, in_features: int, out_features: int, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, path: str | None = None):
        super().__init__()
        packed = np.ascontiguousarray(np.asarray(packed).reshape(-1))
        if not packed.flags.writeable:  # torch.from_numpy wants writable memory (e.g. np.frombuffer of bytes)
            packed = packed.copy()
        if packed.dtype != np.uint8:
            raise TypeError(f"packed must be uint8, got {packed.dtype}")
        if packed.size != packed_nbytes(out_features, in_features):
            raise ValueError(f"packed has {packed.size} bytes, expected {packed_nbytes(out_features, in_features)} "
                             f"for ({out_features}, {in_features})")
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).contiguous()
        if scale.numel() != out_features:
            raise ValueError(f"scale must have {out_features} values (one per output row), got {scale.numel()}")
        if bias is not None:
            bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1).contiguous()
            if bias.numel() != out_features:
                raise ValueError(f"bias must have {out_features} values, got {bias.numel()}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        # Buffers (not parameters): shared with the caller's array when possible, never dequantized.
        self.register_buffer("packed", torch.from_numpy(packed))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._path = kernel.path_id(path)  # resolved once: CPUID / TERNREC_KERNEL_PATH

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   path: str | None = None) -> PackedTernaryLinear:
        """codes int8 (out_features, in_features) in {-1, 0, 1}; weight = scale[:, None] * codes."""
        codes_np = torch.as_tensor(codes).detach().cpu().numpy()
        out_features, in_features = codes_np.shape
        return cls(pack_ternary(codes_np.astype(np.int8, copy=False)), in_features, out_features, scale, bias,
                   path=path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: at batch 1 the torch calls around the kernel cost more than the GEMM itself,
        # so every step is skipped when it would be a no-op.
        if x.shape[-1] != self.in_features or not x.is_cpu:
            raise ValueError(f"expected a CPU tensor (..., {self.in_features}), got {tuple(x.shape)} on {x.device}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        x2 = x2.contiguous()
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        bias = self.bias
        _gemm(x2.data_ptr(), rows, self.in_features, self.packed.data_ptr(), self.out_features,
              self.scale.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), self._path,
              kernel.get_num_threads())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # The kernel reads float32 scale and bias by address: undo dtype casts such as `.half()` or
        # `.to(torch.bfloat16)` on a model that contains this layer (uint8 `packed` is never cast).
        super()._apply(fn, recurse)
        self.scale = self.scale.to(torch.float32).contiguous()
        if self.bias is not None:
            self.bias = self.bias.to(torch.float32).contiguous()
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer (packed weights + scale + bias)."""
        return sum(t.nbytes for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"path={kernel.PATHS[self._path]}, packed_bytes={self.packed.nbytes}")
