"""Sampling: flow-matching solvers, plans split by expert, resumable denoising segments, requests.

Pure PyTorch on one device. The public API (docs/api.md) is re-exported here.
"""

from .loop import DenoiseState, ImageCondition, run_segment, sample, seeded_noise, start_state
from .plan import Plan, Segment, make_plan
from .request import Request, RequestError, make_request
from .schedulers import make_scheduler

__all__ = [
    "DenoiseState",
    "ImageCondition",
    "Plan",
    "Request",
    "RequestError",
    "Segment",
    "make_plan",
    "make_request",
    "make_scheduler",
    "run_segment",
    "sample",
    "seeded_noise",
    "start_state",
]
