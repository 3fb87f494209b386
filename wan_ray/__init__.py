"""wan-ray: Wan2.2 video generation at cluster scale on Ray."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Generator", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import wan_ray` stays cheap for the CLI and Ray workers.
    if name == "Generator":
        from .pipeline import Generator

        return Generator
    raise AttributeError(f"module 'wan_ray' has no attribute {name!r}")
