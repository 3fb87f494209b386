"""Flow-matching ODE solvers for the sampling loop: UniPC (the official default), DPM-Solver++(2M), Euler.

A solver owns its σ grid, the integer timesteps the model is fed, and the rule that moves a latent from
σ_k to σ_{k+1} given the model's velocity `v ≈ ε − x0`. It knows nothing of the model, guidance or
experts: the segment runner calls `step` once per model evaluation. Everything a solver remembers between
steps is in `state_dict()`, so a loop can stop after any step, continue in another process and give the
same bits as one unbroken loop.

Conventions (spec §5): `x_σ = (1 − σ)·x0 + σ·ε`, data prediction `x̂0 = x − σ·v`, `α = 1 − σ`, `λ = ln(α/σ)`.
Like the official code the sample math runs in float32 on whatever device the tensors are on, with σ stored in
float32; the few scalar coefficients per step are Python floats (float64 on the host), so no float64 tensor op
ever runs on the hot path.

One observation shapes the code: UniPC's predictor (bh2, order 2, ρ = ½) is term for term the
DPM-Solver++(2M) midpoint update (its r is the DPM r₀ with the sign flipped, and B(h) = e^{−h} − 1), and
both use order 1 at the first and last step. So the two share `_multistep_update`; UniPC adds the
corrector and uses its own grid.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor


def _unipc_grid(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """Unshifted σ of the official UniPC path: linspace(σ_max, 0, n + 1)[:n], σ_max = float32(1 − 1/N).

    σ_max is the top of the training grid, stored in float32 by the official scheduler before `set_timesteps`
    reads it back, hence the round trip; the first timestep is therefore 999, not 1000.
    """
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    return np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]


def _dpm_grid(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """Unshifted σ of the official DPM++ path (`get_sampling_sigmas`): starts at exactly 1 (timestep 1000)."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


def _log_snr(sigma: float) -> float:
    """λ = ln(α/σ); the ends of the schedule map to ±inf, where the update rules have finite limits."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class FlowScheduler:
    """Base of the flow-matching solvers: σ grid, timestep bookkeeping, step validation and solver state.

    Build one with `make_scheduler`. `timesteps[k]` (int64, length n) is what the model sees at step k and
    `sigmas` (float32, length n + 1, the last 0) is what the update uses. `step(v, t, x)` must be called with
    t = timesteps[step_index]; anything else raises, which is how a segment starting at the wrong step is
    caught.
    `step` takes any shape and returns a float32 tensor on the sample's device.

    State dict (only Python values and CPU tensors; loads with `torch.load(..., weights_only=True)`):

        solver              str           "unipc" | "dpm++" | "euler"           } must match on load:
        num_steps           int           n                                     } rebuild with
        shift               float         s                                     } make_scheduler(same args)
        num_train_timesteps int           N                                     }
        step_index          int           steps taken, 0…n; the next step expects timesteps[step_index]
        x0_history          list[Tensor]  float32 x̂0 of the last min(step_index, 2) steps, oldest first
                                          (always [] for euler)
        last_sample         Tensor|None   unipc: the sample the last predictor started from (after its
                                          correction), needed by the next corrector; None before the first
                                          step and for the other solvers

    No order or warm-up counters are stored: the orders used are functions of step_index (see `_order`), and
    the warm-up count is len(x0_history).
    """

    name: ClassVar[str]
    history_size: ClassVar[int] = 0  # how many past x̂0 the update rule reads
    keeps_last_sample: ClassVar[bool] = False
    _grid: ClassVar = staticmethod(_unipc_grid)

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000) -> None:
        self.num_steps = _check_int("num_steps", num_steps, 1)
        self.num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 2)
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < math.inf:
            raise ValueError(
                f"shift must be a finite number > 0 (official defaults: 12.0 for T2V-A14B, 5.0 for I2V-A14B "
                f"and TI2V-5B; 1.0 means no shift), got {shift!r}"
            )
        self.shift = float(shift)

        # Same float64 numpy arithmetic as the official schedulers, so the truncated timesteps match exactly.
        sigmas = self._grid(self.num_steps, self.num_train_timesteps)
        sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        self.timesteps = torch.from_numpy(sigmas * self.num_train_timesteps).to(torch.int64)  # [n]
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # [n + 1]
        self._sig = self.sigmas.tolist()  # float32 values as Python floats, for host-side coefficients

        self._step_index = 0
        self._x0s: list[Tensor] = []
        self._last_sample: Tensor | None = None

    @property
    def step_index(self) -> int:
        """Steps taken so far; the next `step` goes from sigmas[step_index] to sigmas[step_index + 1]."""
        return self._step_index

    def step(self, model_output: Tensor, timestep: int | float | Tensor, sample: Tensor) -> Tensor:
        """Advance `sample` from σ_k to σ_{k+1} given the model's velocity at (sample, timesteps[k])."""
        k = self._step_index
        if k >= self.num_steps:
            raise RuntimeError(
                f"{self.name} scheduler has already taken all {self.num_steps} steps; "
                "build a new one to sample again"
            )
        self._check_timestep(timestep, k)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
            )
        v, x = model_output.float(), sample.float()
        # A loaded state sits on the CPU; move it to where the sample lives (a no-op otherwise).
        self._x0s = [m.to(x.device) for m in self._x0s]
        if self._last_sample is not None:
            self._last_sample = self._last_sample.to(x.device)
        out = self._update(v, x, k)
        self._step_index = k + 1
        return out

    def _check_timestep(self, timestep: int | float | Tensor, k: int) -> None:
        if isinstance(timestep, Tensor):
            if timestep.numel() != 1:
                raise ValueError(
                    f"timestep must be a scalar (one value), got a tensor of shape {tuple(timestep.shape)}; "
                    "per-token timesteps are the model's business, pass the step's scalar t here"
                )
            timestep = timestep.item()
        expected = int(self.timesteps[k])
        if timestep != expected:
            raise ValueError(
                f"{self.name} step {k} of {self.num_steps} expects timestep {expected}, got {timestep!r}: "
                "the caller is out of step with the scheduler (wrong segment start, or a skipped or "
                "repeated step)"
            )

    def _update(self, v: Tensor, x: Tensor, k: int) -> Tensor:
        raise NotImplementedError

    # -- helpers shared by the multistep solvers ---------------------------------------------------------

    def _lam(self, i: int) -> float:
        return _log_snr(self._sig[i])

    def _order(self, k: int) -> int:
        """Order at step k: 1 on the first step (one x̂0 known) and the last (σ → 0), else 2."""
        return min(2, self.num_steps - k, k + 1)

    def _remember(self, x0: Tensor) -> None:
        self._x0s.append(x0)
        if len(self._x0s) > self.history_size:
            self._x0s.pop(0)

    def _multistep_update(self, x: Tensor, k: int, order: int) -> Tensor:
        """Data-prediction exponential-integrator step σ_k → σ_{k+1}; m_k = x0s[-1], m_{k−1} = x0s[-2].

        order 1:  x' = (σ_{k+1}/σ_k)·x − α_{k+1}·φ·m_k,  h = λ_{k+1} − λ_k,  φ = e^{−h} − 1
        order 2:  x' −= ½·α_{k+1}·φ·D,  D = (m_k − m_{k−1})/r,  r = (λ_k − λ_{k−1})/h
        At σ_{k+1} = 0 (order 1, h = ∞) this is exactly m_k; at σ_{k−1} = 1 (λ = −∞) the D term vanishes.
        """
        s, s_next = self._sig[k], self._sig[k + 1]
        h = self._lam(k + 1) - self._lam(k)
        c = (1.0 - s_next) * math.expm1(-h)
        m = self._x0s[-1]
        out = (s_next / s) * x - c * m
        if order == 2:
            r = (self._lam(k) - self._lam(k - 1)) / h
            out = out - (0.5 * c / r) * (m - self._x0s[-2])
        return out

    # -- state ----------------------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "solver": self.name,
            "num_steps": self.num_steps,
            "shift": self.shift,
            "num_train_timesteps": self.num_train_timesteps,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after `step_index` steps; see the class docstring for the layout."""
        last = self._last_sample
        return {
            **self._config(),
            "step_index": self._step_index,
            "x0_history": [m.detach().cpu() for m in self._x0s],
            "last_sample": None if last is None else last.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, made by a scheduler built with the same arguments. Validates first."""
        for key, mine in self._config().items():
            if state.get(key) != mine:
                raise ValueError(
                    f"state is for {key}={state.get(key)!r} but this scheduler has {key}={mine!r}; "
                    "rebuild it with make_scheduler(...) and the arguments of the one that saved the state"
                )
        k = state.get("step_index")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.num_steps:
            raise ValueError(f"state step_index must be an integer in 0..{self.num_steps}, got {k!r}")
        x0s = list(state.get("x0_history", ()))
        if len(x0s) != min(k, self.history_size) or not all(isinstance(m, Tensor) for m in x0s):
            raise ValueError(
                f"state x0_history must hold {min(k, self.history_size)} tensors after {k} "
                f"{self.name} steps, "
                f"got {len(x0s)} entries"
            )
        last = state.get("last_sample")
        if (self.keeps_last_sample and k > 0) != isinstance(last, Tensor):
            raise ValueError(
                f"state last_sample must be {'a tensor' if self.keeps_last_sample and k > 0 else 'None'} "
                f"for {self.name} after {k} steps, got {type(last).__name__}"
            )
        self._step_index, self._x0s, self._last_sample = k, x0s, last


class EulerScheduler(FlowScheduler):
    """Flow Euler: `x + (σ_{k+1} − σ_k)·v`. No history.

    Wan2.2 ships no Euler solver, so the grid is a choice: it uses UniPC's σ grid, because UniPC's first-order
    predictor *is* this step; the model then sees exactly the official default timesteps (first 999), the
    expert split at the MoE boundary is unchanged, and Euler differs from UniPC only in the update rule.
    """

    name = "euler"

    def _update(self, v: Tensor, x: Tensor, k: int) -> Tensor:
        return x + (self._sig[k + 1] - self._sig[k]) * v


class DPMSolverPPScheduler(FlowScheduler):
    """DPM-Solver++(2M), midpoint, data prediction; order 1 at the first and last step, no corrector
    (spec §5.4).

    Grid of the official `get_sampling_sigmas`: starts at σ = 1, so the first timestep is 1000.
    """

    name = "dpm++"
    history_size = 2
    _grid = staticmethod(_dpm_grid)

    def _update(self, v: Tensor, x: Tensor, k: int) -> Tensor:
        self._remember(x - self._sig[k] * v)
        return self._multistep_update(x, k, self._order(k))


class UniPCScheduler(FlowScheduler):
    """UniPC, order 2, bh2 (B(h) = e^{−h} − 1), predict-x0, corrector from the second step on (spec §5.2–5.3).

    Each step: x̂0 from the sample as given (before correction) → UniC corrects that sample with it (no extra
    model call) → UniP predicts the next one from the corrected sample.
    """

    name = "unipc"
    history_size = 2
    keeps_last_sample = True

    def _update(self, v: Tensor, x: Tensor, k: int) -> Tensor:
        x0 = x - self._sig[k] * v
        # At k = 0, x may be the caller's own tensor: keep a private copy, safe from in-place edits.
        x = self._correct(x0, k) if k > 0 else x.clone()
        self._remember(x0)
        self._last_sample = x
        return self._multistep_update(x, k, self._order(k))

    def _correct(self, x0: Tensor, k: int) -> Tensor:
        """UniC: redo the step σ_{k−1} → σ_k from the sample it started from, now that m_k = x0 is known.

        p, the previous predictor's order, is min(2, k) (only the final step, never corrected after, is also
        order 1). With h = λ_k − λ_{k−1}, φ = B = e^{−h} − 1:
            x_k = (σ_k/σ_{k−1})·x_{k−1} − α_k·φ·m_{k−1} − α_k·B·(ρ₁·D₁ + ρ_last·(m_k − m_{k−1}))
        p = 1: no D₁, ρ_last = ½.
        p = 2: D₁ = (m_{k−2} − m_{k−1})/r₁, r₁ = (λ_{k−2} − λ_{k−1})/h, and (ρ₁, ρ_last) solve
               [[1, 1], [r₁, 1]]·ρ = [g₁/B, 2·g₂/B] with g₁ = φ/(−h) − 1, g₂ = g₁/(−h) − ½.
        """
        s_prev, s = self._sig[k - 1], self._sig[k]
        h = self._lam(k) - self._lam(k - 1)
        phi = math.expm1(-h)
        a = 1.0 - s
        m_prev = self._x0s[-1]
        out = (s / s_prev) * self._last_sample - (a * phi) * m_prev
        if k == 1:  # the previous predictor was the first step, order 1
            rho_last = 0.5
        else:
            r1 = (self._lam(k - 2) - self._lam(k - 1)) / h
            g1 = phi / -h - 1.0
            g2 = g1 / -h - 0.5
            b1, b2 = g1 / phi, 2.0 * g2 / phi
            rho1 = (b1 - b2) / (1.0 - r1)  # 2×2 solve by elimination; r₁ < 0, so 1 − r₁ > 1
            rho_last = b1 - rho1
            out = out - (a * phi * rho1 / r1) * (self._x0s[-2] - m_prev)
        return out - (a * phi * rho_last) * (x0 - m_prev)


_SOLVERS: dict[str, type[FlowScheduler]] = {
    "unipc": UniPCScheduler,
    "dpm++": DPMSolverPPScheduler,
    "euler": EulerScheduler,
}


def make_scheduler(name: str, num_steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowScheduler:
    """A fresh solver `name` ('unipc', 'dpm++' or 'euler') with `num_steps` steps and timestep shift."""
    cls = _SOLVERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown solver {name!r}; accepted: {', '.join(map(repr, _SOLVERS))}")
    return cls(num_steps, shift, num_train_timesteps)
