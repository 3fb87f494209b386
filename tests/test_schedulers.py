"""Flow-matching solvers: official timestep grids; update rules against an independent float64
implementation of spec §5 and against numbers from the official Wan2.2 solvers; bit-identical resume from
a state dict; errors."""

import io
import math

import numpy as np
import pytest
import torch

from wan_ray.sampling.schedulers import make_scheduler

SOLVERS = ("unipc", "dpm++", "euler")

# Produced by the official Wan2.2 code (wan/utils/fm_solvers_unipc.py, fm_solvers.py) built as in
# wan/text2video.py: UniPC via set_timesteps(n, shift=s), DPM++ via get_sampling_sigmas + retrieve_timesteps.
# (timesteps, sigmas[:2], sigmas[n - 1]); sigmas are the float32 values, sigmas[n] is 0.
OFFICIAL_GRIDS = {
    ("unipc", 40, 12.0): (
        [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
         922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235],
        [0.9999166131019592, 0.9977826476097107], 0.23510953783988953,
    ),
    ("unipc", 50, 5.0): (
        [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
         882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
         555, 522, 487, 448, 405, 356, 302, 241, 172, 92],
        [0.9997998476028442, 0.9957323670387268], 0.09250685572624207,
    ),
    ("unipc", 40, 3.0): (
        [999, 991, 982, 973, 963, 954, 944, 933, 922, 911, 899, 887, 874, 861, 847, 832, 817, 801, 785, 767,
         749, 730, 710, 688, 666, 642, 617, 590, 562, 531, 499, 465, 428, 388, 345, 299, 249, 195, 136, 71],
        [0.9996664524078369, 0.9911891222000122], 0.07136054337024689,
    ),
    ("dpm++", 40, 12.0): (
        [1000, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 957, 952, 947, 941, 936, 929,
         923, 915, 907, 898, 888, 878, 865, 852, 837, 819, 800, 776, 750, 717, 679, 631, 571, 493, 387, 235],
        [1.0, 0.9978678226470947], 0.23529411852359772,
    ),
    ("dpm++", 50, 5.0): (
        [1000, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 921, 913, 906, 898, 890,
         882, 873, 864, 854, 844, 833, 821, 809, 797, 783, 769, 753, 737, 720, 701, 681, 660, 637, 612, 585,
         555, 523, 487, 448, 405, 357, 303, 241, 172, 92],
        [1.0, 0.9959349632263184], 0.09259258955717087,
    ),
    ("dpm++", 40, 3.0): (
        [1000, 991, 982, 973, 964, 954, 944, 933, 923, 911, 900, 887, 874, 861, 847, 833, 818, 802, 785, 768,
         750, 730, 710, 689, 666, 642, 617, 590, 562, 532, 500, 465, 428, 388, 346, 300, 249, 195, 136, 71],
        [1.0, 0.991525411605835], 0.0714285746216774,
    ),
}

# Official solvers run on `_field` from `_initial_sample()`: (sum of the final sample, its first 4 entries).
OFFICIAL_FINAL = {
    ("unipc", 3, 12.0): (-17.759170, [-0.148709, -0.118456, -0.098477, -0.08851]),
    ("unipc", 40, 12.0): (-7.713048, [-0.067237, 0.169964, 0.36901, 0.504616]),
    ("unipc", 50, 5.0): (-7.346215, [-0.064167, 0.178629, 0.382616, 0.521821]),
    ("dpm++", 3, 12.0): (-17.768547, [-0.148797, -0.118763, -0.098915, -0.089017]),
    ("dpm++", 40, 12.0): (-7.695921, [-0.067103, 0.170513, 0.369898, 0.505722]),
    ("dpm++", 50, 5.0): (-7.321068, [-0.063964, 0.179333, 0.383756, 0.523266]),
}


def _initial_sample() -> torch.Tensor:
    """A fixed 'noise' latent without an RNG (stable across torch versions)."""  # [1, 2, 3, 4, 5]
    return (torch.sin(torch.arange(120, dtype=torch.float64) * 0.37) * 1.5).float().reshape(1, 2, 3, 4, 5)


def _field(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth toy velocity field standing in for the DiT (same dtype as x)."""
    s = float(sigma)
    return (0.9 + 0.3 * s) * x - 0.5 * torch.tanh(x) * (1.0 - s) + 0.2 * s


def _run(sched, x, steps=None):
    """Step `sched` `steps` times (default: to the end) on `_field`; returns every sample produced."""
    out = []
    for _ in range(sched.num_steps - sched.step_index if steps is None else steps):
        k = sched.step_index
        x = sched.step(_field(x, sched.sigmas[k]), sched.timesteps[k], x)
        out.append(x)
    return out


# -- an independent float64 implementation of spec §5, written from the formulas ---------------------------


def _lam(s: float) -> float:
    return -math.inf if s >= 1 else math.inf if s <= 0 else math.log((1 - s) / s)


def _reference(solver: str, sigmas: list[float], x: torch.Tensor) -> list[torch.Tensor]:
    x = x.double()
    n = len(sigmas) - 1
    lam = [_lam(s) for s in sigmas]
    alpha = [1 - s for s in sigmas]
    m: list[torch.Tensor] = []  # x̂0 per step
    out, x_start, prev_order = [], None, 0
    for k in range(n):
        v = _field(x, sigmas[k])
        if solver == "euler":
            x = x + (sigmas[k + 1] - sigmas[k]) * v
            out.append(x)
            continue
        m.append(x - sigmas[k] * v)  # from the uncorrected sample
        if solver == "unipc" and k >= 1:  # UniC with p = the previous predictor's order
            h = lam[k] - lam[k - 1]
            phi = math.exp(-h) - 1
            B = phi
            corr = 0.0
            if prev_order == 1:
                rho_last = 0.5
            else:
                r1 = (lam[k - 2] - lam[k - 1]) / h
                D1 = (m[k - 2] - m[k - 1]) / r1
                g1 = phi / (-h) - 1
                g2 = g1 / (-h) - 0.5
                R, b = np.array([[1.0, 1.0], [r1, 1.0]]), np.array([g1 / B, 2 * g2 / B])
                rho1, rho_last = np.linalg.solve(R, b)
                corr = rho1 * D1
            x = (sigmas[k] / sigmas[k - 1]) * x_start - alpha[k] * phi * m[k - 1] - alpha[k] * B * (
                corr + rho_last * (m[k] - m[k - 1])
            )
        order = 1 if k == 0 or k == n - 1 else 2
        h = lam[k + 1] - lam[k]
        phi = math.exp(-h) - 1
        x_start, prev_order = x, order
        if solver == "unipc":  # UniP, bh2: B = φ, ρ = 1/2
            x = (sigmas[k + 1] / sigmas[k]) * x - alpha[k + 1] * phi * m[k]
            if order == 2:
                r = (lam[k - 1] - lam[k]) / h
                x = x - alpha[k + 1] * phi * 0.5 * (m[k - 1] - m[k]) / r
        else:  # DPM-Solver++(2M), midpoint
            D0, D1 = m[k], 0.0
            if order == 2:
                r0 = (lam[k] - lam[k - 1]) / h
                D1 = (m[k] - m[k - 1]) / r0
            x = (sigmas[k + 1] / sigmas[k]) * x - alpha[k + 1] * phi * D0 - 0.5 * alpha[k + 1] * phi * D1
        out.append(x)
    return out


# -- grids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(OFFICIAL_GRIDS))
def test_grid_matches_official(key):
    solver, n, shift = key
    timesteps, first_sigmas, last_sigma = OFFICIAL_GRIDS[key]
    sched = make_scheduler(solver, n, shift)
    assert sched.timesteps.dtype == torch.int64 and sched.timesteps.tolist() == timesteps
    assert sched.sigmas.dtype == torch.float32 and sched.sigmas.shape == (n + 1,)
    assert sched.sigmas[:2].tolist() == first_sigmas
    assert sched.sigmas[n - 1].item() == last_sigma and sched.sigmas[n].item() == 0.0
    if solver == "unipc":  # Euler shares UniPC's grid (documented choice)
        euler = make_scheduler("euler", n, shift)
        assert torch.equal(euler.timesteps, sched.timesteps) and torch.equal(euler.sigmas, sched.sigmas)


def test_expert_split_of_default_schedules():
    # Spec §4.1: T2V (40 steps, shift 12, boundary 875): 26 high-noise steps; I2V (shift 5, 900): 15.
    assert int((make_scheduler("unipc", 40, 12.0).timesteps >= 875).sum()) == 26
    assert int((make_scheduler("unipc", 40, 5.0).timesteps >= 900).sum()) == 15


# -- update rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("n", "shift"), [(1, 5.0), (2, 3.0), (3, 12.0), (12, 5.0), (40, 12.0)])
def test_trajectory_matches_float64_reference(solver, n, shift):
    sched = make_scheduler(solver, n, shift)
    x = _initial_sample()
    ours = _run(sched, x)
    ref = _reference(solver, sched.sigmas.tolist(), x)
    assert len(ours) == n and all(o.dtype == torch.float32 for o in ours)
    torch.testing.assert_close(torch.stack(ours), torch.stack(ref).float(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("key", sorted(OFFICIAL_FINAL))
def test_final_sample_matches_official_solver(key):
    solver, n, shift = key
    total, first = OFFICIAL_FINAL[key]
    final = _run(make_scheduler(solver, n, shift), _initial_sample())[-1]
    assert final.double().sum().item() == pytest.approx(total, abs=2e-4)
    torch.testing.assert_close(final.flatten()[:4], torch.tensor(first), rtol=0, atol=5e-6)


def test_euler_is_first_order_unipc_on_the_same_grid():
    # One step to σ = 0 is x̂0 = x − σ0·v for every solver.
    x = _initial_sample()
    for solver in SOLVERS:
        sched = make_scheduler(solver, 1, 5.0)
        out = _run(sched, x)[0]
        torch.testing.assert_close(out, x - sched.sigmas[0] * _field(x, sched.sigmas[0]), rtol=0, atol=1e-6)


def test_unipc_state_is_not_aliased_to_the_callers_sample():
    x = _initial_sample()
    expected = _run(make_scheduler("unipc", 4, 5.0), x)[-1]
    sched, y = make_scheduler("unipc", 4, 5.0), x.clone()
    nxt = sched.step(_field(y, sched.sigmas[0]), sched.timesteps[0], y)
    y.zero_()  # a caller reusing its buffer must not change the solver's memory
    assert torch.equal(_run(sched, nxt)[-1], expected)


# -- resume --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_resume_from_state_dict_is_bit_identical(solver):
    n, shift = 6, 5.0
    x0 = _initial_sample()
    expected = _run(make_scheduler(solver, n, shift), x0)[-1]
    for split in range(n + 1):
        first = make_scheduler(solver, n, shift)
        x = ([x0, *_run(first, x0, split)])[-1]
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        second = make_scheduler(solver, n, shift)
        second.load_state_dict(state)
        assert second.step_index == split
        final = ([x, *_run(second, x)])[-1]
        assert torch.equal(final, expected), f"{solver}: resume after {split} steps differs"


def test_state_dict_layout():
    sched = make_scheduler("unipc", 5, 5.0)
    _run(sched, _initial_sample(), 3)
    state = sched.state_dict()
    assert {k: state[k] for k in ("solver", "num_steps", "shift", "num_train_timesteps", "step_index")} == {
        "solver": "unipc", "num_steps": 5, "shift": 5.0, "num_train_timesteps": 1000, "step_index": 3,
    }
    assert len(state["x0_history"]) == 2 and state["last_sample"].device.type == "cpu"
    euler = make_scheduler("euler", 5, 5.0)
    _run(euler, _initial_sample(), 2)
    assert euler.state_dict()["x0_history"] == [] and euler.state_dict()["last_sample"] is None


# -- errors --------------------------------------------------------------------------------------------------


def test_wrong_timestep_and_overrun_raise():
    sched = make_scheduler("unipc", 2, 5.0)
    x = _initial_sample()
    with pytest.raises(ValueError, match="step 0 of 2 expects timestep 999, got 1000"):
        sched.step(x, 1000, x)
    with pytest.raises(ValueError, match="scalar"):
        sched.step(x, torch.full((1, 7), 999), x)
    with pytest.raises(ValueError, match="shape"):
        sched.step(x[..., :2], 999, x)
    assert sched.step_index == 0  # rejected calls change nothing
    _run(sched, x)
    with pytest.raises(RuntimeError, match="already taken all 2 steps"):
        sched.step(x, 0, x)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ddim", 10, 5.0), "unknown solver 'ddim'; accepted: 'unipc', 'dpm\\+\\+', 'euler'"),
        (("unipc", 0, 5.0), "num_steps must be an integer >= 1, got 0"),
        (("unipc", 2.5, 5.0), "num_steps must be an integer >= 1"),
        (("euler", 10, 0.0), "shift must be a finite number > 0"),
        (("dpm++", 10, -1), "shift must be a finite number > 0"),
        (("dpm++", 10, float("nan")), "shift must be a finite number > 0"),
    ],
)
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(*args)


def test_load_state_dict_rejects_mismatched_state():
    sched = make_scheduler("dpm++", 4, 5.0)
    _run(sched, _initial_sample(), 2)
    state = sched.state_dict()
    with pytest.raises(ValueError, match=r"shift=5\.0 but this scheduler has shift=3\.0"):
        make_scheduler("dpm++", 4, 3.0).load_state_dict(state)
    with pytest.raises(ValueError, match="solver='dpm\\+\\+' but this scheduler has solver='unipc'"):
        make_scheduler("unipc", 4, 5.0).load_state_dict(state)
    with pytest.raises(ValueError, match="x0_history must hold 2 tensors"):
        make_scheduler("dpm++", 4, 5.0).load_state_dict({**state, "x0_history": state["x0_history"][:1]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_resumes_across_devices():
    for solver in SOLVERS:
        cpu = _run(make_scheduler(solver, 8, 5.0), _initial_sample())[-1]
        first = make_scheduler(solver, 8, 5.0)
        x = _run(first, _initial_sample().cuda(), 3)[-1]
        second = make_scheduler(solver, 8, 5.0)
        second.load_state_dict(first.state_dict())  # CPU tensors, continued on the GPU
        final = _run(second, x)[-1]
        assert final.device.type == "cuda" and final.dtype == torch.float32
        torch.testing.assert_close(final.cpu(), cpu, rtol=1e-5, atol=1e-5)
