"""Reward profiles: named recipes in one file that `serve` (and `polyreward score`) loads, with a default.

A profile is a `RecipeSpec` (space, weights, normalize, aggregate, transform, pessimism, constraints) with a
description; a request names one with `profile`, its own recipe fields override the profile's, and a request
that names none gets the default. `/get_reward`, whose callers cannot send options, always uses the default:
one declared, logged reward definition for a whole training run. Every profile must apply to every served
model: a profile naming an objective a model lacks fails that model's load, naming both.

    default: helpful-safe
    profiles:
      helpful-safe:
        description: helpfulness with a safety floor, pessimistic
        weights: {helpfulness: 1.0, safety: 0.5}
        pessimism: {kappa: 1.0}
        constraints: {min: {safety: -1.0}, penalty: 2.0}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.files import read_yaml_file
from polyreward.models.runtime.manifest import Manifest
from polyreward.service.postprocess import Recipe
from polyreward.service.recipe import RecipeError, RecipeSpec

log = logging.getLogger("polyreward.service")


class Profile(RecipeSpec):
    description: str = ""


class ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: str | None = Field(None, description="the profile of requests that name none (and /get_reward)")
    profiles: dict[str, Profile] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_exists(self) -> ProfileFile:
        if self.default is not None and self.default not in self.profiles:
            raise ValueError(f"default: {self.default!r} is not one of the profiles {sorted(self.profiles)}")
        return self


class Profiles:
    """The loaded profile file (or none: every request's recipe is its own)."""

    def __init__(self, file: ProfileFile | None = None, source: str = ""):
        self.file, self.source = file, source

    @classmethod
    def load(cls, path: Path | None) -> Profiles:
        """Read a YAML (or JSON) profile file; a bad one is an error naming the file and the field."""
        if path is None:
            return cls()
        return cls(read_yaml_file(Path(path), ProfileFile, "profiles"), str(path))

    @property
    def default(self) -> str | None:
        return self.file.default if self.file else None

    def listing(self) -> dict:
        """What /v1/models shows: each profile's fields, and which is the default."""
        if self.file is None:
            return {"default": None, "profiles": {}}
        return {
            "default": self.file.default,
            "profiles": {n: p.model_dump(exclude_defaults=True) for n, p in self.file.profiles.items()},
        }

    def spec(self, name: str | None) -> tuple[str | None, RecipeSpec]:
        """(profile name, its recipe) for a request's `profile` (None: the default, if any)."""
        name = name if name is not None else self.default
        if name is None:
            return None, RecipeSpec()
        profiles = self.file.profiles if self.file else {}
        if name not in profiles:
            raise RecipeError(
                f"profile: {name!r} is not loaded (loaded: {sorted(profiles) or 'none'})", "unknown_profile"
            )
        profile = profiles[name]
        return name, RecipeSpec(**profile.model_dump(exclude={"description"}, exclude_unset=True))

    def check(self, manifest: Manifest, rules: Sequence[str] = ()) -> None:
        """Build every profile against a model about to be served (with the rule objectives that follow its
        learned ones); the first that cannot apply is an error."""
        for name in self.file.profiles if self.file else ():
            try:
                Recipe.build(manifest, self.spec(name)[1], rules)
            except RecipeError as e:
                raise PolyrewardError(
                    f"profiles: {self.source}: profile {name!r} on model {manifest.name!r}: {e}"
                ) from None
        if self.file:
            log.info("profiles from %s apply to %s (default: %s)", self.source, manifest.name, self.default)
