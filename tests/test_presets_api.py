"""Preset API: typed signatures, generated ``Args:`` sections, ``describe``, batch keys, keyword aliases.

Assembling a preset takes milliseconds, so every preset is checked; one step is compiled.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import tiny_mlp

import somax
from somax.presets.registry import ALIASES, Description, Option, define_preset
from somax.registry import did_you_mean

PRESETS = somax.list_methods()


def _sig(name):
    return inspect.signature(getattr(somax.presets, name))


def _model_kwargs(name, predict):
    """Enough model for ``name`` to assemble: ``predict_fn`` (with ``loss`` for the Hessian presets)."""
    params = _sig(name).parameters
    return {"predict_fn": predict, **({"loss": "ce"} if "loss_fn" in params else {})}


# ----------------------------------------------------------------------------- signatures and docs


@pytest.mark.parametrize("name", PRESETS)
def test_signature_is_keyword_only_typed_options_with_defaults(name):
    params = list(_sig(name).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] in (["predict_fn"], ["loss_fn"])
    assert params[0] is positional[0]
    for p in params[1:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, p.name
        assert p.default is not inspect.Parameter.empty, p.name
    assert _sig(name).return_annotation is somax.SecondOrderMethod
    for key in ("x_key", "y_key", "weight_key", "learning_rate", "telemetry", "reject_nonfinite"):
        assert key in _sig(name).parameters, (name, key)


def test_signature_shows_types_and_defaults():
    text = str(_sig("sgn_mse"))
    for needle in (
        "maxiter: int = 10",
        "tol: float = 1e-05",
        "warm_start: bool = True",
        "x_key: str = 'x'",
        "weight_key: str | None = None",
        "learning_rate: Union[float, Callable[[int], float]] = 1.0",
    ):
        assert needle in text, needle
    assert "gamma: float = 0.01" in str(_sig("sophia_h")) and "gamma: float = 0.05" in str(_sig("sophia_g"))
    assert "hessian_power: float = 1.0" in str(_sig("adahessian"))


def _args(name):
    """The ``Args:`` section of the preset's docstring: option name -> description (continuations joined)."""
    doc = getattr(somax.presets, name).__doc__
    section = doc.split("\nArgs:\n", 1)[1]
    out, key = {}, None
    for line in section.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            key, _, text = line.strip().partition(": ")
            out[key] = text
        elif line.startswith("    ") and key is not None:
            out[key] += " " + line.strip()
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_docstring_args_section_describes_every_option(name):
    args = _args(name)
    assert list(args) == list(_sig(name).parameters)
    assert all(text and text != "(no description)" for text in args.values()), args
    assert inspect.getdoc(getattr(somax.presets, name)).count("\nArgs:\n") == 1


def test_shared_options_are_described_once_and_composed_in():
    docs = {name: _args(name) for name in PRESETS}
    for key in ("x_key", "y_key", "weight_key", "telemetry", "curvature_kwargs", "reject_nonfinite"):
        assert len({docs[name][key] for name in PRESETS}) == 1, key
    cg = [name for name in PRESETS if "maxiter" in docs[name]]
    assert {"sgn_mse", "sgn_ce", "newton_cg", "egn_mse_cg", "egn_ce_cg"} <= set(cg)
    assert len({docs[name]["tol"] for name in cg}) == 1
    # a preset's own wording where an option means something else
    assert docs["sophia_g"]["eps"] != docs["adahessian"]["eps"] and "max(γ·h, ε)" in docs["sophia_g"]["eps"]


def test_describe_is_a_str_that_the_repl_shows_as_text():
    text = somax.describe("sgn_ce")
    assert isinstance(text, Description) and isinstance(text, str)
    assert repr(text) == str(text) and "\n" in repr(text) and not repr(text).startswith("'")
    assert text.startswith("sgn_ce: Stochastic Gauss-Newton")
    assert "  maxiter = 10  (int)" in text and "  x_key = 'x'  (str)" in text
    assert "the batch entry holding the model inputs" in text
    assert "Args:" not in text  # the option list replaces the docstring's Args section

    class Printer:  # IPython's pretty printer interface
        out = ""

        def text(self, s):
            self.out += s

    printer = Printer()
    text._repr_pretty_(printer, False)
    assert printer.out == str(text)


def test_make_and_describe_say_how_to_list_options():
    doc = somax.make.__doc__
    for needle in ("somax.describe(name)", "inspect.signature(somax.presets.<name>)", "somax.list_methods()", "x_key"):
        assert needle in doc, needle
    assert "repr" in somax.describe.__doc__


def test_define_preset_accepts_bare_defaults_and_infers_their_types():
    from somax.presets import registry

    fn = define_preset(
        "_test_bare_defaults",
        lambda o: somax.sgn_mse(lambda p, x: x, maxiter=o["iters"]),
        positional=None,
        options={"iters": 3, "label": Option("a", str, "a label.")},
        doc="A test preset.",
    )
    try:
        sig = inspect.signature(fn)
        assert str(sig).startswith("(*, iters: int = 3, label: str = 'a')")
        assert "  iters: (no description)" in fn.__doc__ and "  label: a label." in fn.__doc__
        method = fn(iters=4)
        assert method.preset == ("_test_bare_defaults", {"iters": 4, "label": "a"})
    finally:
        registry.PRESETS.pop("_test_bare_defaults")


# ----------------------------------------------------------------------------- batch keys


@pytest.mark.parametrize("name", PRESETS)
def test_batch_keys_given_directly_reach_the_curvature(name):
    _, predict = tiny_mlp()
    method = somax.make(name, **_model_kwargs(name, predict), x_key="image", y_key="label", weight_key="w")
    assert method.preset[1]["x_key"] == "image"
    reader = getattr(method.curvature, "reader", None)
    if reader is not None:  # GGN curvature
        assert (reader.x_key, reader.y_key, reader.weight_key) == ("image", "label", "w")
    else:  # Hessian of predict_fn + loss: trace its loss on a batch that has only the renamed keys
        params, _ = tiny_mlp()
        batch = {"image": jnp.ones((4, 3)), "label": jnp.zeros((4,), jnp.int32), "w": jnp.ones((4,))}
        value, _ = jax.eval_shape(method.curvature.loss, params, batch, (), None)
        assert value.shape == ()


def test_curvature_kwargs_keys_still_work_and_agreeing_duplicates_are_allowed():
    _, predict = tiny_mlp()
    old = somax.make("sgn_ce", predict, curvature_kwargs={"x_key": "image", "y_key": "label"})
    assert (old.curvature.reader.x_key, old.curvature.reader.y_key) == ("image", "label")
    both = somax.make("sgn_ce", predict, x_key="image", curvature_kwargs={"x_key": "image", "y_key": "label"})
    assert (both.curvature.reader.x_key, both.curvature.reader.y_key) == ("image", "label")
    default = somax.make("sgn_ce", predict)  # nothing given: the curvature's own defaults
    assert default.curvature.reader.x_key == "x" and default.preset[1]["x_key"] == "x"


@pytest.mark.parametrize(
    "direct, nested",
    [
        ({"x_key": "image"}, {"x_key": "img"}),
        ({"x_key": "x"}, {"x_key": "image"}),
        ({"weight_key": "w"}, {"weight_key": None}),
    ],
)
def test_conflicting_batch_keys_raise_naming_both_values(direct, nested):
    _, predict = tiny_mlp()
    (key, value), (_, other) = next(iter(direct.items())), next(iter(nested.items()))
    message = rf"sgn_ce: {key}={value!r} given directly but {key}={other!r} in curvature_kwargs"
    with pytest.raises(TypeError, match=message):
        somax.make("sgn_ce", predict, **direct, curvature_kwargs=nested)


def test_batch_keys_with_loss_fn_raise():
    with pytest.raises(TypeError, match="newton_cg: x_key name.*loss_fn\\(params, batch\\) reads the batch itself"):
        somax.make("newton_cg", lambda p, b: jnp.sum(p["w"]), x_key="image")


def test_one_step_reads_renamed_keys_and_weights():
    """sgn_ce with ``x_key``/``y_key``/``weight_key``: the step's loss and gradient norm are the
    weighted CE ``Σ w ℓ / Σ w`` on the renamed entries (one tiny compile)."""
    params, predict = tiny_mlp()
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((6, 3))),
        "label": jnp.asarray(rng.integers(0, 2, 6)),
        "w": jnp.asarray([1.0, 0.0, 2.0, 1.0, 0.5, 0.0]),
    }
    method = somax.make("sgn_ce", predict, x_key="image", y_key="label", weight_key="w", maxiter=2)
    _, _, info = jax.jit(method.step)(params, batch, method.init(params))

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(predict(p, batch["image"]), batch["label"])
        return jnp.sum(batch["w"] * ce) / jnp.sum(batch["w"])

    grad = jax.grad(loss)(params)
    grad_norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grad)))
    np.testing.assert_allclose(float(info["loss"]), float(loss(params)), rtol=1e-12)
    np.testing.assert_allclose(float(info["grad_norm"]), grad_norm, rtol=1e-10)
    assert bool(info["step_accepted"])


# ----------------------------------------------------------------------------- misspelled keywords


@pytest.mark.parametrize(
    "name, wrong, meant",
    [
        ("sgn_mse", "lr", "learning_rate"),
        ("sgn_mse", "learning_rate_fn", "learning_rate"),
        ("sophia_g", "lr", "learning_rate"),
        ("sgn_ce", "lam", "lam0"),
        ("egn_ce", "lambda", "lam0"),
        ("newton_cg", "lambda0", "lam0"),
        ("adahessian", "damping", "eps"),
        ("sgn_ce", "every_k", "tr_every_k"),
        ("sophia_h", "every_k", "eval_every_k"),
        ("sgn_mse", "max_iter", "maxiter"),
        ("sophia_g", "n_probes", "n_samples"),
        ("sophia_n", "n_samples", "n_probes"),
        ("adahessian", "beta2", "b2"),
        ("sgn_ce", "label_key", "y_key"),
        ("sgn_ce", "lerning_rate", "learning_rate"),  # a typo: the closest name
    ],
)
def test_misspelled_keyword_suggests_the_option_meant(name, wrong, meant):
    _, predict = tiny_mlp()
    message = rf"{name}\(\) got an unexpected keyword argument '{wrong}'\. Did you mean '{meant}'\?"
    with pytest.raises(TypeError, match=message):
        somax.make(name, predict, **{wrong: 0.1})


def test_alias_targets_are_options_and_did_you_mean_is_unchanged():
    options = set().union(*(_sig(name).parameters for name in PRESETS))
    for alias, targets in ALIASES.items():
        assert targets and set(targets) <= options, alias
    # the generic helper keeps its closest-match behaviour for other callers
    assert did_you_mean("lr", ["learning_rate", "tol"]) == " Did you mean 'tol'?"
    assert did_you_mean("sgn_mes", ["sgn_mse", "sgn_ce"]) == " Did you mean 'sgn_mse'?"
