"""wan-ray: Wan2.2 video generation at cluster scale on Ray."""

__version__ = "0.1.0"
