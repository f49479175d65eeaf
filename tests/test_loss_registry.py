"""Tests of the loss registry: short names, dotted paths, DictConfig, errors, entry points.

Third-party losses are exercised through REAL entry points: each test writes a tiny package
and a ``<dist>.dist-info`` directory (METADATA + entry_points.txt) into ``tmp_path`` and puts
it on ``sys.path``; ``importlib.metadata`` then discovers it like any installed distribution.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
import warnings

import pytest
from omegaconf import OmegaConf

import torchtune_prefopt.losses as losses
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.losses import (
    ENTRY_POINT_GROUP,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    KTOLoss,
    PreferenceLoss,
    RobustDPOLoss,
    SimPOLoss,
    available_losses,
    build_loss,
    get_loss_class,
)

BUILTINS = {
    "dpo": DPOLoss,
    "ipo": IPOLoss,
    "simpo": SimPOLoss,
    "kto": KTOLoss,
    "hinge": HingeLoss,
    "rso": HingeLoss,
    "robust_dpo": RobustDPOLoss,
}


def test_public_api():
    assert ENTRY_POINT_GROUP == "torchtune_prefopt.losses"
    for name in (
        "PreferenceLoss",
        "DPOLoss",
        "IPOLoss",
        "SimPOLoss",
        "KTOLoss",
        "HingeLoss",
        "RobustDPOLoss",
        "build_loss",
        "available_losses",
        "get_loss_class",
        "ENTRY_POINT_GROUP",
    ):
        assert name in losses.__all__ and hasattr(losses, name)


def test_available_losses_builtins():
    found = available_losses()
    for name, cls in BUILTINS.items():
        assert found[name] is cls
    assert all(issubclass(c, PreferenceLoss) for c in found.values())
    assert list(found) == sorted(found)


@pytest.mark.parametrize("name, cls", sorted(BUILTINS.items()))
def test_short_names(name, cls):
    assert get_loss_class(name) is cls
    assert get_loss_class(name.upper()) is cls  # case-insensitive
    assert type(build_loss(name)) is cls


def test_short_name_defaults():
    loss = build_loss("dpo")
    assert (loss.beta, loss.label_smoothing) == (0.1, 0.0)


def test_component_short_name_with_kwargs():
    loss = build_loss({"_component_": "simpo", "beta": 2.5, "gamma": 0.5})
    assert isinstance(loss, SimPOLoss)
    assert (loss.beta, loss.gamma) == (2.5, 0.5)


@pytest.mark.parametrize(
    "path",
    [
        "torchtune_prefopt.losses.IPOLoss",
        "torchtune_prefopt.losses.ipo.IPOLoss",
        "torchtune_prefopt.losses.ipo:IPOLoss",
    ],
)
def test_component_dotted_path(path):
    loss = build_loss({"_component_": path, "tau": 0.3, "average_logps": False})
    assert isinstance(loss, IPOLoss)
    assert (loss.tau, loss.average_logps) == (0.3, False)
    assert isinstance(build_loss(path), IPOLoss)


def test_dictconfig_input():
    cfg = OmegaConf.create(
        {"beta": 0.25, "loss": {"_component_": "kto", "beta": "${beta}", "undesirable_weight": 1.5}}
    )
    loss = build_loss(cfg.loss)  # interpolations resolved
    assert isinstance(loss, KTOLoss)
    assert (loss.beta, loss.desirable_weight, loss.undesirable_weight) == (0.25, 1.0, 1.5)
    # A DictConfig with a dotted path, as torchtune configs write it.
    cfg = OmegaConf.create({"_component_": "torchtune_prefopt.losses.DPOLoss", "beta": 0.2})
    assert build_loss(cfg).beta == 0.2


def test_name_key_input():
    loss = build_loss({"name": "hinge", "beta": 0.3})
    assert isinstance(loss, HingeLoss) and loss.beta == 0.3
    assert isinstance(build_loss(OmegaConf.create({"name": "rso"})), HingeLoss)


def test_spec_is_not_mutated():
    spec = {"_component_": "dpo", "beta": 0.2}
    build_loss(spec)
    assert spec == {"_component_": "dpo", "beta": 0.2}


def test_instance_passes_through():
    loss = IPOLoss(tau=0.2)
    assert build_loss(loss) is loss


@pytest.mark.parametrize("spec", ["foo", {"_component_": "foo"}, {"name": "foo", "beta": 1.0}])
def test_unknown_name_lists_valid_names(spec):
    with pytest.raises(ValueError) as info:
        build_loss(spec)
    message = str(info.value)
    assert message.startswith(
        "loss: unknown loss 'foo'; valid: apo_zero, dpo, dpo_norm, dpop, hinge, ipo, kto, "
    )
    for name in BUILTINS:
        assert name in message


def test_bad_specs():
    with pytest.raises(ValueError, match="either '_component_' or 'name', not both"):
        build_loss({"_component_": "dpo", "name": "dpo"})
    with pytest.raises(ValueError, match="needs '_component_'.*or 'name'"):
        build_loss({"beta": 0.1})
    with pytest.raises(TypeError, match="expected a loss name or a mapping"):
        build_loss(0.1)
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg_xyz.Loss'"):
        build_loss("no_such_pkg_xyz.Loss")
    with pytest.raises(ValueError, match="has no attribute 'NoSuchLoss'"):
        build_loss("torchtune_prefopt.losses.NoSuchLoss")


def test_unexpected_kwarg_names_the_key():
    with pytest.raises(ValueError) as info:
        build_loss({"_component_": "dpo", "betta": 0.2})
    assert str(info.value).startswith("loss.betta: DPOLoss")
    assert "accepted: beta, label_smoothing" in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"_component_": "dpo", "beta": -1.0}, "loss.beta must be > 0, got -1.0"),
        (
            {"_component_": "dpo", "label_smoothing": 0.5},
            "loss.label_smoothing must be in [0, 0.5), got 0.5",
        ),
        ({"name": "simpo", "gamma": -1}, "loss.gamma must be >= 0, got -1.0"),
        ({"name": "ipo", "tau": 0}, "loss.tau must be > 0, got 0.0"),
        (
            {"_component_": "kto", "desirable_weight": -2.0},
            "loss.desirable_weight must be > 0, got -2.0",
        ),
        (
            {"_component_": "kto", "undesirable_weight": 0.0},
            "loss.undesirable_weight must be > 0, got 0.0",
        ),
        ({"_component_": "rso", "beta": 0.0}, "loss.beta must be > 0, got 0.0"),
    ],
)
def test_bad_hyperparameters(spec, message):
    with pytest.raises(ValueError) as info:
        build_loss(OmegaConf.create(spec))
    assert str(info.value).startswith(message), str(info.value)
    # The recipe re-raises PrefOptUserError unchanged as a one-line error.
    assert isinstance(info.value, PrefOptUserError)


@pytest.mark.parametrize(
    "spec, builtin_type",
    [
        ("foo", ValueError),
        ({"name": "dpo", "_component_": "dpo"}, ValueError),
        ({"_component_": "dpo", "betta": 1.0}, ValueError),
        ("no_such_pkg_xyz.Loss", ValueError),
        ("torchtune.rlhf.loss.DPOLoss", TypeError),
        (3, TypeError),
    ],
)
def test_registry_errors_are_user_errors(spec, builtin_type):
    with pytest.raises(builtin_type) as info:
        build_loss(spec)
    assert isinstance(info.value, PrefOptUserError)
    assert str(info.value).startswith("loss")


def test_torchtune_loss_is_rejected_with_a_hint():
    # torchtune's own DPOLoss does not declare reference_free/average_logps/paired.
    with pytest.raises(TypeError) as info:
        build_loss({"_component_": "torchtune.rlhf.loss.DPOLoss", "beta": 0.1})
    message = str(info.value)
    assert "reference_free, average_logps, paired" in message
    assert "'dpo'" in message


def test_dotted_path_to_non_class():
    with pytest.raises(TypeError, match="not a class"):
        get_loss_class("torchtune_prefopt.losses.build_loss")


# ------------------------------------------------------------------ real entry points
LOSS_MODULE = """
import torch
from torchtune_prefopt.losses import PreferenceLoss


class MyLoss(PreferenceLoss):
    reference_free = True
    average_logps = True
    paired = True

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, policy_chosen_logps, policy_rejected_logps,
                reference_chosen_logps=None, reference_rejected_logps=None):
        losses = torch.relu(self.margin - (policy_chosen_logps - policy_rejected_logps))
        return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()


class DuckLoss(torch.nn.Module):
    # Not a PreferenceLoss subclass, but declares the attributes the recipe reads.
    reference_free = False
    average_logps = False
    paired = True


class NotALoss(torch.nn.Module):
    pass
"""


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """Write a distribution (package + dist-info with entry points) and put it on sys.path."""
    created_modules = []

    def install(entry_points: dict, module_source: str = LOSS_MODULE, broken: bool = False):
        pkg = f"tp_plugin_{uuid.uuid4().hex[:10]}"
        created_modules.append(pkg)
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        body = "import no_such_dependency_xyz  # noqa\n" if broken else ""
        (tmp_path / pkg / "losses.py").write_text(body + textwrap.dedent(module_source))
        dist = tmp_path / f"{pkg}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.1\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"]
        lines += [f"{name} = {pkg}.losses:{attr}" for name, attr in entry_points.items()]
        (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
        return pkg

    yield install
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in created_modules):
            del sys.modules[name]


def test_entry_point_loss(install_plugin):
    pkg = install_plugin({"myloss": "MyLoss"})
    loss = build_loss("myloss")
    assert type(loss).__module__ == f"{pkg}.losses" and type(loss).__name__ == "MyLoss"
    assert loss.margin == 1.0
    assert build_loss({"_component_": "myloss", "margin": 2.0}).margin == 2.0
    assert build_loss(OmegaConf.create({"name": "myloss", "margin": 3.0})).margin == 3.0
    assert available_losses()["myloss"] is type(loss)
    assert get_loss_class("myloss") is type(loss)
    # Built-ins are still there, and the unknown-name message now lists the plugin too.
    assert available_losses()["dpo"] is DPOLoss
    with pytest.raises(
        ValueError, match="valid: apo_zero, dpo, dpo_norm, dpop, hinge, ipo, kto, myloss, orpo"
    ):
        build_loss("foo")


def test_entry_point_duck_typed_class_is_accepted(install_plugin):
    install_plugin({"duck": "DuckLoss"})
    assert get_loss_class("duck").__name__ == "DuckLoss"


def test_entry_point_that_is_not_a_loss(install_plugin):
    install_plugin({"notaloss": "NotALoss", "myloss": "MyLoss"})
    with pytest.raises(TypeError) as info:
        get_loss_class("notaloss")
    message = str(info.value)
    assert "entry point 'notaloss = " in message
    assert "reference_free, average_logps, paired" in message
    # The bad plugin does not break the listing: it is left out with a warning.
    with pytest.warns(UserWarning, match="notaloss"):
        found = available_losses()
    assert "notaloss" not in found and "myloss" in found


def test_broken_entry_point_gives_clear_error(install_plugin):
    pkg = install_plugin({"brokenloss": "MyLoss"}, broken=True)
    with pytest.raises(ImportError) as info:
        build_loss("brokenloss")
    assert isinstance(info.value, PrefOptUserError)
    message = str(info.value)
    assert f"entry point 'brokenloss = {pkg}.losses:MyLoss'" in message
    assert ENTRY_POINT_GROUP in message
    assert "no_such_dependency_xyz" in message
    # Listing still works, without the broken entry.
    with pytest.warns(UserWarning, match="brokenloss"):
        found = available_losses()
    assert "brokenloss" not in found and found["dpo"] is DPOLoss
    # Other names are unaffected.
    assert isinstance(build_loss("ipo"), IPOLoss)


def test_entry_point_cannot_shadow_builtin(install_plugin):
    install_plugin({"dpo": "MyLoss"})
    assert get_loss_class("dpo") is DPOLoss
    with pytest.warns(UserWarning, match="shadowed by the built-in loss 'dpo'"):
        assert available_losses()["dpo"] is DPOLoss


def test_no_warnings_without_plugins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        available_losses()
