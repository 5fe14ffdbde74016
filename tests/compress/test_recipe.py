"""Recipes are validated once, before any work, with errors that list what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeglm.compress.passes import known_kinds
from edgeglm.compress.recipe import DEFAULT_RECIPE, load_recipe, parse_recipe
from edgeglm.errors import ConfigError


def test_default_recipe_is_distill_fuse_quantize_with_a_time_factorized_student() -> None:
    recipe = load_recipe()
    assert recipe.source == DEFAULT_RECIPE
    assert [p.kind for p in recipe.passes] == ["distill", "fuse", "quantize"]
    assert recipe.passes[0].temporal == 8 and recipe.passes[0].hidden == (48, 24)
    assert {"prune", "distill", "export", "fuse", "quantize"} <= set(known_kinds())


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"pass #1: unknown pass 'shrink'; known passes: .*quantize"):
        parse_recipe('[[pass]]\nkind = "shrink"\n')


def test_unknown_field_lists_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"pass #2: \[export\] unknown field\(s\) \['opsett'\]; valid fields: .*opset"
    ):
        parse_recipe('[[pass]]\nkind = "export"\n[[pass]]\nkind = "export"\nopsett = 17\n')


def test_bad_value_is_caught_at_load_time() -> None:
    with pytest.raises(ConfigError, match=r"opset must be in 13\.\.23"):
        parse_recipe('[[pass]]\nkind = "export"\nopset = 7\n')


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[recipe]\nname = 'x'\n", "no passes"),
        ("[[pass]]\nratio = 0.5\n", "has no kind"),
        ("[recipe]\nschema_version = 9\n[[pass]]\nkind='export'\n", "schema_version 9"),
        ("[recipe]\nauthor = 'me'\n[[pass]]\nkind='export'\n", r"unknown \[recipe\] key"),
        ("[passes]\nkind = 'export'\n", r"unknown table\(s\) \['passes'\]"),
        ("[[pass]\nkind = 1", "not valid TOML"),
    ],
)
def test_malformed_recipes(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_recipe(text)


def test_missing_recipe_file_points_at_the_shipped_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(tmp_path / "nope.toml")
    assert str(DEFAULT_RECIPE) in (info.value.hint or "")
