"""gpu-governor: keeps NVIDIA GPUs inside thermal, power and VRAM budgets."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
