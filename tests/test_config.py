"""The configuration a component is built from: its parser, and the settings a run resolved."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from custom.config import MAX_LIST, calling_config, calling_parser, plain_settings


def test_a_component_sees_the_parser_that_builds_it_and_nothing_outside_one():
    parser = ConfigParser({"probe": {"_target_": "custom.config.calling_parser"}})
    assert parser.get_parsed_content("probe") is parser
    assert calling_parser() is None
    with pytest.raises(RuntimeError, match="while a MONAI bundle config is being parsed"):
        calling_config()


def test_plain_settings_are_the_resolved_top_level_plain_values():
    config = {
        "epochs": 4,
        "steps": "$@epochs * 2",  # an expression: logged as its value
        "name": "run",
        "ratio": "@lr",
        "lr": 0.5,
        "path": "$pathlib.Path('/x')",
        "sizes": [32, 32],
        "long": list(range(MAX_LIST + 1)),  # data, not a setting
        "unset": None,
        "never_used": 7,  # no component referenced it: not resolved, not logged
        "net": {"_target_": "torch.nn.Identity"},
        "nested": {"value": "@epochs"},
        "uses": ["@steps", "@name", "@ratio", "@path", "@sizes", "@long", "@unset", "@net", "@nested#value"],
    }
    parser = ConfigParser(config, globals={"pathlib": "pathlib"})
    parser.get_parsed_content("uses")
    settings = plain_settings(parser)
    assert settings["steps"] == "8" and settings["epochs"] == "4" and settings["ratio"] == "0.5"
    assert settings["path"] == str(Path("/x")) and settings["sizes"] == "[32, 32]" and settings["name"] == "run"
    assert not {"long", "unset", "never_used", "net", "nested", "uses"} & set(settings)
    assert not [k for k in settings if "#" in k or "::" in k]
