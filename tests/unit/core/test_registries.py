"""Conformance of every registry: declared options are complete and enforced the same way."""

from __future__ import annotations

import pytest

import surgical as sg
from surgical.core.errors import SurgicalError
from surgical.core.registry import Option, Registry

REGISTRIES = {
    "criteria": sg.CRITERIA,
    "schedules": sg.SCHEDULES,
    "export formats": sg.EXPORT_FORMATS,
    "merge methods": sg.MERGE_METHODS,
    "data criteria": sg.DATA_CRITERIA,
    "token criteria": sg.TOKEN_CRITERIA,
}
ENTRIES = [(label, e.name) for label, reg in REGISTRIES.items() for e in reg.entries()]


@pytest.mark.parametrize("label, name", ENTRIES)
def test_every_entry_declares_help_and_typed_options(label, name):
    entry = REGISTRIES[label].entry(name)
    assert entry.help and entry.help[0].islower() or entry.help[0] in "|(" or entry.help[0].isupper()
    for o in entry.options:
        assert o.type in (int, float, str, bool) and o.help
        assert o.check(o.default, "x") == o.default  # the default passes its own checks
    assert REGISTRIES[label].resolve(name, {}) == {o.name: o.default for o in entry.options}


@pytest.mark.parametrize("label, name", ENTRIES)
def test_unknown_options_are_refused_uniformly(label, name):
    with pytest.raises(SurgicalError, match=r"unknown option\(s\) no_such_option for .*Its options are"):
        REGISTRIES[label].resolve(name, {"no_such_option": 1})


@pytest.mark.parametrize("label", REGISTRIES)
def test_unknown_name_lists_the_known_ones(label):
    reg = REGISTRIES[label]
    with pytest.raises(SurgicalError, match="Use one of: " + ", ".join(reg.names())):
        reg.get("no-such-name")


def test_option_values_are_coerced_and_range_checked():
    reg: Registry[object] = Registry("thing")
    options = [
        Option("n", int, 2, "n", low=1),
        Option("p", float, 0.5, "p", low=0, high=1, low_open=True),
        Option("mode", str, "x", "m", choices=("x", "y")),
        Option("on", bool, False, "b"),
    ]
    reg.register("a", options=options)(object())
    assert reg.resolve("a", {"n": "3", "p": "1e-1", "on": "true"}) == {
        "n": 3,
        "p": 0.1,
        "mode": "x",
        "on": True,
    }
    for bad, message in [
        ({"n": 0}, "must be >= 1, got 0"),
        ({"n": 1.5}, "must be an integer"),
        ({"n": True}, "must be an integer"),
        ({"p": 0.0}, r"must be in \(0, 1\], got 0.0"),
        ({"p": float("nan")}, "must be a finite number"),
        ({"mode": "z"}, "must be one of x, y"),
        ({"on": "maybe"}, "must be true or false"),
    ]:
        with pytest.raises(SurgicalError, match=message):
            reg.resolve("a", bad)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(object())


def test_describe_lists_every_entry_and_option():
    lines = "\n".join(sg.CRITERIA.describe())
    for e in sg.CRITERIA.entries():
        assert f"{e.name}: " in lines
        for o in e.options:
            assert f"    {o.name} ({o.type.__name__}, default {o.default!r}" in lines
