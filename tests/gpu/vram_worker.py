"""A real CUDA process holding VRAM: ``python3 vram_worker.py START_GIB STEP_GIB EVERY_S MAX_GIB MARKER``.

Allocates START_GIB GiB, then STEP_GIB more every EVERY_S seconds up to MAX_GIB, then
holds it until signalled. MARKER only tags the command line (process classes match on
it). It prints ``ready`` after the first allocation. It changes no GPU setting.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any


def main() -> int:
    torch: Any = importlib.import_module("torch")  # only on the GPU machine
    start, step, every, most = (float(a) for a in sys.argv[1:5])
    blocks = [torch.ones(int(start * 2**30), dtype=torch.uint8, device="cuda")]
    held = start
    torch.cuda.synchronize()
    print("ready", flush=True)
    while True:
        time.sleep(every)
        if step > 0 and held + step <= most:
            blocks.append(torch.ones(int(step * 2**30), dtype=torch.uint8, device="cuda"))
            torch.cuda.synchronize()
            held += step
            print(f"holding {held:g} GiB", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
