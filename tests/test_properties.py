"""Property-based tests (hypothesis): cadences from any counter value, StepInfo packing, CG.

Each test's docstring states its property. What compiles is compiled once, outside the
examples (``functools.cache``), and the examples vary only array inputs; examples are
derandomized, so every run checks the same cases.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import somax
from somax.plan import Plan, ProbeRequest, cadence_gate
from somax.solvers.cg import conjugate_gradient
from somax.specs import OFF, CurvatureSpec, DampingSpec, EstimatorSpec, PrecondSpec, SolverSpec, TelemetrySpec
from somax.telemetry import CORE_FIELDS, SENTINELS, InfoField, fill_info, info_rows, to_floats

INT32_MAX = 2**31 - 1
PROPERTY = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# ============================================================================ cadences


def _plan(ks):
    """A plan whose probe ``"p"`` is requested by ``r0, r1, …`` with cadences ``ks``."""
    requests = tuple(ProbeRequest("p", f"r{i}", k) for i, k in enumerate(ks))
    return Plan(lane="param", components={}, requests=requests, info_schema={})


@settings(PROPERTY, max_examples=200)
@given(st.lists(st.one_of(st.just(OFF), st.integers(1, 64), st.integers(1, 10**6)), max_size=6))
def test_count_period_is_the_largest_common_multiple_below_int32(ks):
    """``P = plan.count_period`` satisfies ``0 < P ≤ 2³¹ − 1``; when ``L = lcm`` of the active
    cadences is at most ``2³¹ − 1``, ``P`` is a multiple of every cadence and the largest one
    (``P + L > 2³¹ − 1``); otherwise ``P = 2³¹ − 1``."""
    active = [k for k in ks if k != OFF]
    lcm = math.lcm(*active) if active else 1
    period = _plan(ks).count_period
    assert 0 < period <= INT32_MAX
    if lcm <= INT32_MAX:
        assert period % lcm == 0 and period + lcm > INT32_MAX
    else:
        assert period == INT32_MAX


WINDOW = 64


@settings(PROPERTY, max_examples=60)
@given(
    ks=st.lists(st.one_of(st.just(OFF), st.integers(1, 40)), min_size=1, max_size=4),
    laps=st.integers(0, 3),
    where=st.sampled_from(["start", "before_wrap", "anywhere"]),
    offset=st.integers(0, INT32_MAX),
)
def test_gate_fires_exactly_on_multiples_of_each_cadence_across_the_wrap(ks, laps, where, offset):
    """For virtual steps ``t = t₀ … t₀ + 63`` (any number of counter wraps before ``t₀``, and
    windows that cross a wrap) the int32 counter is ``c = t mod P``; ``cadence_gate(c, ks)``
    (the traced gate, here on a vector of counters) is True iff ``k | t`` for some active
    ``k``, and ``plan.fires_at(probe, c, requester=rᵢ)`` iff ``kᵢ | t``."""
    plan = _plan(ks)
    period = plan.count_period
    phase = {"start": offset % WINDOW, "before_wrap": period - 1 - offset % WINDOW, "anywhere": offset % period}
    t0 = laps * period + phase[where]
    ts = t0 + np.arange(WINDOW, dtype=np.int64)
    counts = (ts % period).astype(np.int32)
    active = [k for k in ks if k != OFF]
    expected = np.array([any(t % k == 0 for k in active) for t in ts.tolist()])
    fired = np.broadcast_to(np.asarray(cadence_gate(jnp.asarray(counts), ks)), (WINDOW,))
    np.testing.assert_array_equal(fired, expected)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(plan.gate("p", jnp.asarray(counts))), (WINDOW,)), expected)
    for i, k in enumerate(ks):
        got = [plan.fires_at("p", int(c), requester=f"r{i}") for c in counts[:16]]
        assert got == [k != OFF and t % k == 0 for t in ts[:16].tolist()]


K_ESTIMATOR, K_DAMPING, K_NORMS, K_LOSS_AFTER = 3, 4, 5, 7
PERIOD = (INT32_MAX // 420) * 420  # 420 = lcm(3, 4, 5, 7)


@functools.cache
def _cadence_method():
    """One method with four cadences (diagonal lane, a linear model: a cheap compile), its jitted step."""
    predict = lambda p, x: x @ p["w"]  # noqa: E731
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        estimator=EstimatorSpec("hutchinson", kwargs={"eval_every_k": K_ESTIMATOR}),
        precondition=PrecondSpec("diag_ema"),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("trust_region", lam0=1.0, kwargs={"every_k": K_DAMPING}),
        telemetry=TelemetrySpec(norms_every_k=K_NORMS, loss_after_every_k=K_LOSS_AFTER),
    )
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)}  # fmt: skip
    return method, params, batch, jax.jit(method.step)


@settings(PROPERTY, max_examples=25)
@given(
    start=st.one_of(st.integers(0, 40), st.integers(PERIOD - 40, PERIOD - 1), st.integers(0, PERIOD - 1)),
    n=st.integers(1, 10),
)
@example(start=PERIOD - 4, n=10)  # crosses the wrap
@example(start=0, n=10)
def test_each_component_acts_on_its_own_cadence_from_any_counter_value(start, n):
    """Start the step counter at any ``c₀ ∈ [0, P)`` (near 0, just before the wrap, anywhere) and
    take ``n`` steps; with ``t = c₀ + i`` the virtual step: ``info["step"] = t mod P``, the counter
    becomes ``(t + 1) mod P``, and at step ``t`` the estimator refreshes iff ``3 | t``, the trust
    region updates λ and the rho bundle fires iff ``4 | t``, ``loss_after`` is known iff
    ``4 | t`` or ``7 | t``, and the norms probe fires iff ``5 | t`` (one compiled step)."""
    method, params, batch, step = _cadence_method()
    assert method.plan.count_period == PERIOD
    state = method.init(params)._replace(count=jnp.asarray(start, jnp.int32))
    key = jax.random.PRNGKey(0)
    for t in range(start, start + n):
        refreshes = int(state.estimator.refreshes)
        params, state, info = step(params, batch, state, key)
        assert bool(info["finite"])
        assert int(info["step"]) == t % PERIOD and int(state.count) == (t + 1) % PERIOD
        assert int(state.estimator.refreshes) - refreshes == (t % K_ESTIMATOR == 0)
        assert (int(info["tr_action"]) != -1) == (t % K_DAMPING == 0)
        assert (not math.isnan(float(info["pred_decrease"]))) == (t % K_DAMPING == 0)
        assert (not math.isnan(float(info["loss_after"]))) == (t % K_DAMPING == 0 or t % K_LOSS_AFTER == 0)
        assert (not math.isnan(float(info["rel_update"]))) == (t % K_NORMS == 0)


# ============================================================================ StepInfo packing

#: the core fields plus an array field (like ``top_eigs``), which is kept unpacked
SCHEMA = {**CORE_FIELDS, "top_eigs": InfoField("float", "top eigenvalues", shape=(3,))}
KEYS = [k for k in CORE_FIELDS] + ["top_eigs/0", "top_eigs/1", "top_eigs/2"]
DTYPES = {"int": np.int32, "bool": np.bool_}


def _scalar_strategy(kind, dtype):
    """Field values, the kind's sentinel among them."""
    if kind == "float":
        return st.one_of(st.just(math.nan), st.floats(width=np.finfo(dtype).bits))
    if kind == "int":
        return st.one_of(st.just(-1), st.integers(-(2**31), INT32_MAX))
    return st.booleans()


@st.composite
def _step_values(draw):
    """A float dtype and values for a random subset of the schema (the rest are not computed)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    values = {}
    for key, field in SCHEMA.items():
        if draw(st.booleans()):
            if field.shape == ():
                values[key] = draw(_scalar_strategy(field.kind, dtype))
            else:
                entries = draw(st.lists(_scalar_strategy(field.kind, dtype), min_size=3, max_size=3))
                values[key] = np.asarray(entries, dtype)
    return dtype, values


def _expected(field, value, dtype):
    """What the field must read back as: the value, or the kind's sentinel, in the field's dtype."""
    kind_dtype = DTYPES.get(field.kind, dtype)
    if value is None:
        value = SENTINELS[field.kind]
    return np.broadcast_to(np.asarray(value, kind_dtype), field.shape)


def _floats(array):
    """``to_floats``' spelling of an array's entries: Python floats, every nan the object ``math.nan``."""
    return [math.nan if math.isnan(v) else v for v in np.asarray(array, np.float64).reshape(-1).tolist()]


@settings(PROPERTY, max_examples=40)
@given(_step_values())
def test_one_step_info_round_trips_every_field_with_stable_keys(case):
    """For values given for any subset of the fields (sentinels and non-finite values among them):
    ``fill_info`` then reading returns each given value, and the kind's sentinel for every other
    field, in the field's dtype (float fields in the step's float dtype, ints int32, bools bool),
    inside the mapping, after ``numpy()`` and after a pytree round trip; its keys are the schema's
    in order, and ``to_floats`` has the same keys whatever was given, with the same numbers."""
    dtype, values = case
    info = fill_info(SCHEMA, values, dtype)
    assert list(info) == list(SCHEMA)
    leaves, treedef = jax.tree_util.tree_flatten(info)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    host = info.numpy()
    row = to_floats(info)
    assert list(row) == KEYS
    for key, field in SCHEMA.items():
        want = _expected(field, values.get(key), dtype)
        for got in (info[key], rebuilt[key], host[key]):
            chex.assert_shape(got, field.shape)
            assert np.asarray(got).dtype == want.dtype, (key, np.asarray(got).dtype)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=key)
        flat = [row[key]] if field.shape == () else [row[f"{key}/{i}"] for i in range(3)]
        assert flat == _floats(want), (key, flat)  # list equality: every nan must be the object math.nan


SCAN_MAX = 1000


@functools.cache
def _scan_builder():
    """``lax.scan`` of ``fill_info`` over ``SCAN_MAX`` steps of given values (one compile)."""

    def body(carry, values):
        return carry, fill_info(SCHEMA, values, jnp.float32)

    return jax.jit(lambda values: jax.lax.scan(body, None, values)[1])


def _random_columns(seed):
    """``SCAN_MAX`` values per field; about a fifth of them the kind's sentinel, some ±inf."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, field in SCHEMA.items():
        shape = (SCAN_MAX, *field.shape)
        if field.kind == "float":
            col = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
            col[rng.random(shape) < 0.2] = np.nan
            col[rng.random(shape) < 0.03] = np.inf
            col[rng.random(shape) < 0.03] = -np.inf
        elif field.kind == "int":
            col = rng.integers(-(2**31), INT32_MAX, shape, dtype=np.int64, endpoint=True).astype(np.int32)
            col[rng.random(shape) < 0.2] = -1
        else:
            col = rng.random(shape) < 0.5
        out[key] = col
    return out


def _check_rows(rows, columns, length):
    assert len(rows) == length
    for t, row in enumerate(rows):
        assert list(row) == KEYS
        for key, field in SCHEMA.items():
            flat = [row[key]] if field.shape == () else [row[f"{key}/{i}"] for i in range(3)]
            want = _floats(columns[key][t])
            assert flat == want, (t, key, flat, want)


@settings(PROPERTY, max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, SCAN_MAX), fmt=st.sampled_from(["csv", "jsonl"]))
@example(seed=1, length=SCAN_MAX, fmt="csv")
@example(seed=2, length=SCAN_MAX, fmt="jsonl")
@example(seed=3, length=1, fmt="csv")
def test_scanned_infos_give_one_row_per_step_with_the_values_and_fixed_keys(seed, length, fmt):
    """A ``lax.scan`` of any length ``T ∈ [1, 1000]`` over steps with random field values
    (sentinels, ±inf and extremes among them): ``info_rows`` returns ``T`` rows, all with the same
    keys in the schema's order, row ``t`` holding step ``t``'s values (every nan ``math.nan``) and
    equal to ``to_floats`` of step ``t``; ``InfoWriter`` writes them so that reading the file back
    recovers every number (CSV: exactly, ``nan``/``inf`` spelled out; JSON lines: non-finite as null)."""
    columns = _random_columns(seed)
    infos = jax.device_get(_scan_builder()(columns))
    infos = jax.tree_util.tree_map(lambda x: x[:length], infos)
    assert isinstance(infos, somax.StepInfo)
    chex.assert_shape(infos["loss"], (length,))
    rows = info_rows(infos)
    _check_rows(rows, columns, length)
    for t in sorted({0, length // 2, length - 1}):
        assert to_floats(jax.tree_util.tree_map(lambda x, t=t: x[t], infos)) == rows[t]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"log.{fmt}")
        with somax.InfoWriter(path) as log:
            assert log.write(infos) == length
        with open(path, encoding="utf-8") as f:
            if fmt == "csv":
                back = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            else:
                back = [{k: (math.nan if v is None else float(v)) for k, v in json.loads(line).items()} for line in f]
    if fmt == "jsonl":  # null stands for every non-finite value
        rows = [{k: (v if math.isfinite(v) else math.nan) for k, v in row.items()} for row in rows]
    back = [{k: (math.nan if math.isnan(v) else v) for k, v in r.items()} for r in back]
    assert back == rows


# ============================================================================ CG
# tests/test_safeguards.py covers singular systems from x₀ = 0 (bounded descent for every λ);
# here: full-rank and indefinite systems of every size up to N_MAX, plain and Jacobi-preconditioned,
# from 0 and warm-started, against numpy's float64 solve.

N_MAX = 12


@functools.cache
def _cg(preconditioned: bool, warm: bool):
    """Jitted CG on an ``N_MAX``-padded system ``blockdiag(A, I) x = (b, 0)`` (one compile per variant)."""

    def run(a, b, x0, diag, tol):
        return conjugate_gradient(
            lambda v: a @ v,
            b,
            x0=x0 if warm else None,
            tol=tol,
            maxiter=4 * N_MAX,
            precond=(lambda v: v / diag) if preconditioned else None,
        )

    return jax.jit(run)


def _pad(n, a, b, x0, diag):
    """The system embedded in ``N_MAX`` dimensions: ``blockdiag(A, I)``, ``(b, 0)``, ``(x₀, 0)``, ``(d, 1)``."""
    big = np.eye(N_MAX)
    big[:n, :n] = a
    vectors = [np.zeros(N_MAX), np.zeros(N_MAX), np.ones(N_MAX)]
    for out, v in zip(vectors, (b, x0, diag), strict=True):
        out[:n] = v
    return (big, *vectors)


def _system(seed, n, log_cond, lam, negative):
    """``A = Q diag(λᵢ) Qᵀ + λI`` with ``|λᵢ| ∈ [1, 10^log_cond]``, ``negative`` of them below zero."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    evals = 10.0 ** rng.uniform(0, log_cond, n)
    evals[:1] = 1.0
    evals[-1:] = 10.0**log_cond if n > 1 else 1.0
    evals[: min(negative, n)] *= -1
    a = (q * evals) @ q.T + lam * np.eye(n)
    a = (a + a.T) / 2
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1)
    diag = np.abs(np.diag(a)) + 1e-3
    return a, b, x0, diag


CG_CASES = dict(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, N_MAX),
    log_cond=st.floats(0.0, 4.0),
    lam=st.sampled_from([0.0, 1e-8, 1e-3, 1.0]),
    tol=st.sampled_from([1e-12, 1e-8, 1e-4]),
    preconditioned=st.booleans(),
)


@settings(PROPERTY, max_examples=40)
@given(**CG_CASES, warm=st.booleans())
def test_cg_on_spd_systems_meets_its_reported_residual(seed, n, log_cond, lam, tol, preconditioned, warm):
    """For SPD ``A`` (``n ≤ 12``, ``κ(A) ≤ 10⁴``, any λ ≥ 0, any ``b``), plain or Jacobi-
    preconditioned, from 0 or from any ``x₀``: CG returns a finite ``x`` within ``maxiter``
    iterations; the residual it reports is the true ``‖b − Ax‖/‖b‖`` up to rounding; when it
    reports convergence, that residual is at most ``tol`` and ``x`` is within ``κ·tol·‖x*‖`` of
    numpy's float64 solution ``x*``; from 0, ``bᵀx > 0``."""
    a, b, x0, diag = _system(seed, n, log_cond, lam, negative=0)
    res = _cg(preconditioned, warm)(*_pad(n, a, b, x0, diag), tol)
    x = np.asarray(res.x)
    chex.assert_tree_all_finite(res.x)
    np.testing.assert_array_equal(x[n:], 0.0)  # the padding is never touched
    x = x[:n]
    assert 0 <= int(res.iters) <= 4 * N_MAX
    cond = np.linalg.cond(a)
    true_residual = np.linalg.norm(b - a @ x) / np.linalg.norm(b)
    slack = 1e-12 * cond
    assert abs(float(res.residual) - true_residual) <= slack + 1e-6 * true_residual
    if bool(res.converged):
        assert true_residual <= tol + slack
        exact = np.linalg.solve(a, b)
        chex.assert_trees_all_close(x, exact, atol=cond * (tol + slack) * np.linalg.norm(exact), rtol=0.0)
    if not warm:
        assert b @ x > 0


@settings(PROPERTY, max_examples=40)
@given(**CG_CASES, negative=st.integers(1, N_MAX))
def test_cg_from_zero_is_a_descent_direction_for_any_symmetric_system(
    seed, n, log_cond, lam, tol, preconditioned, negative
):
    """For symmetric ``A = QΛQᵀ + λI`` with ``negative ≥ 1`` of the ``Λᵢ`` below zero (an indefinite
    Hessian, or a singular or definite one after the shift λ), plain or Jacobi-preconditioned,
    from ``x₀ = 0``: CG returns a finite ``x`` with ``bᵀx > 0``; unless it reports negative
    curvature, it met the tolerance or ran ``maxiter`` iterations."""
    a, b, _, diag = _system(seed, n, log_cond, lam, negative)
    res = _cg(preconditioned, False)(*_pad(n, a, b, np.zeros(n), diag), tol)
    chex.assert_tree_all_finite(res.x)
    x = np.asarray(res.x)[:n]
    assert b @ x > 0
    if not bool(res.negative_curvature):
        assert bool(res.converged) or int(res.iters) == 4 * N_MAX


def test_warm_started_cg_on_an_indefinite_system_returns_a_descent_direction():
    """A = diag(−1, 1), b = (1, ½), x₀ = (−1, 0): r₀ = (0, ½) sees only positive curvature, CG
    converges in one iteration to A⁻¹b = (−1, ½), and bᵀx = −¾: the descent check after every
    warm-started solve falls back to ``b``, a direction with bᵀx > 0."""
    a = np.diag([-1.0, 1.0])
    b = np.array([1.0, 0.5])
    res = _cg(False, True)(*_pad(2, a, b, np.array([-1.0, 0.0]), np.ones(2)), 1e-8)
    assert float(np.asarray(res.x)[:2] @ b) > 0


# ============================================================================ probe products


@functools.cache
def _probe_products_problem():
    """A tiny float64 MLP with its dense Hessian, GGN, gradient and loss, and for each curvature
    and probe count a jitted ``linearize_with_products`` with a traced ``fire``."""
    from oracles import classification_batch, dense_ggn, dense_grad, dense_hessian, output_loss_fn, tiny_mlp

    from somax.curvature import ggn_ce, hessian

    params, predict = tiny_mlp(sizes=(3, 4, 3))
    batch = classification_batch(c=3, b=5)
    loss_fn = output_loss_fn(predict, "ce")
    dense = {"hessian": dense_hessian(loss_fn, params, batch), "ggn": dense_ggn(predict, params, batch, "ce")}
    curvatures = {"hessian": hessian(predict_fn=predict, loss="ce", hvp="jvp"), "ggn": ggn_ce(predict_fn=predict)}

    @functools.cache
    def compiled(kind, n):
        def run(probes, fire):
            lin, products = curvatures[kind].linearize_with_products(params, batch, None, None, probes, n, fire)
            return lin.grad, lin.loss, products

        return jax.jit(run)

    want = (dense_grad(loss_fn, params, batch), float(loss_fn(params, batch)))
    return params, curvatures, dense, compiled, want


@settings(PROPERTY, max_examples=16)
@given(st.sampled_from(["hessian", "ggn"]), st.sampled_from([None, 3]), st.booleans(), st.integers(0, 2**31 - 1))
def test_linearize_with_products_is_the_gradient_and_the_dense_products(kind, n, fire, seed):
    """For every probe set ``z`` (``n`` stacked, or one unstacked) and either value of a traced
    ``fire``: ``linearize_with_products`` returns the batch gradient and loss, and ``H z`` (dense
    float64 Hessian or GGN times each probe) where ``fire`` holds, zeros where it does not — for
    the Hessian's one-pass form (``hvp="jvp"``) and for the default (``linearize`` + ``matvec``)."""
    from jax.flatten_util import ravel_pytree

    params, curvatures, dense, compiled, (grad, loss) = _probe_products_problem()
    flat_params, unravel = ravel_pytree(params)
    z = np.random.default_rng(seed).standard_normal((1 if n is None else n, flat_params.size))
    stacked = jax.vmap(unravel)(jnp.asarray(z))
    probes = jax.tree.map(lambda a: a[0], stacked) if n is None else stacked
    g, value, products = compiled(kind, n)(probes, jnp.asarray(fire))
    flatten = lambda t: ravel_pytree(t)[0]  # noqa: E731
    got = np.asarray(flatten(products) if n is None else jax.vmap(flatten)(products))
    expected = z @ dense[kind].T if fire else np.zeros_like(z)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(flatten(g)), grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(float(value), loss, rtol=1e-12)
