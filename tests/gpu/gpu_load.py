"""A real PyTorch load for the GPU tests and the bench: ``python3 gpu_load.py GIB SECONDS``.

Allocates GIB GiB on the current CUDA device, warms up bf16 matmuls, prints ``ready``
(then the memory stays put), and runs matmuls until SECONDS have passed. It only uses
the GPU; it changes no GPU setting.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any


def main() -> int:
    torch: Any = importlib.import_module("torch")  # only on the GPU machine

    gib, seconds = float(sys.argv[1]), float(sys.argv[2])
    device = torch.device("cuda")
    block = torch.ones(int(gib * 2**30), dtype=torch.uint8, device=device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    c = a @ b
    for _ in range(10):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
    del block
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
