"""The resolved spec of a run: everything a run needs, fixed at submission and stored on it.

`build_run_spec` is where presets, `--set key=value` overrides and repo specs meet; it refuses
unknown keys and bad values with the valid choices listed, before anything is queued.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from schemas.base import Frozen, describe_errors
from schemas.corpus import CorpusConfig
from schemas.errors import InvalidSpec
from schemas.repo import RepoSpec, parse_repo_spec
from schemas.sampling import SampleConfig
from schemas.training import DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig

# The sections `--set` can reach, in the order a bare key is looked up.
SECTIONS: dict[str, type[Frozen]] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "corpus": CorpusConfig,
    "sample": SampleConfig,
}


class RunSpec(Frozen):
    name: str
    repos: tuple[RepoSpec, ...]
    preset: str = DEFAULT_PRESET
    corpus: CorpusConfig = CorpusConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    init_from: str | None = None  # a run id whose weights start this run (fine-tuning)
    init_from_checkpoint: str | None = None  # that run's best checkpoint key, resolved at submit


def settable_keys() -> list[str]:
    return [f"{section}.{field}" for section, cls in SECTIONS.items() for field in cls.model_fields]


def _split_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, _, field = key.partition(".")
        if section in SECTIONS and field in SECTIONS[section].model_fields:
            return section, field
    else:
        for section, cls in SECTIONS.items():
            if key in cls.model_fields:
                return section, key
    raise InvalidSpec(f"unknown setting {key!r}; valid keys: {', '.join(settable_keys())}")


def parse_sets(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`["rnn_size=256", "train.seed=7"]` -> `{"model": {"rnn_size": "256"}, "train": {...}}`."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSpec(f"--set expects key=value, got {item!r}")
        section, field = _split_key(key.strip())
        annotation = SECTIONS[section].model_fields[field].annotation
        if "tuple" in str(annotation):  # list-valued settings: comma separated
            out.setdefault(section, {})[field] = tuple(v.strip() for v in value.split(",") if v.strip())
        else:
            out.setdefault(section, {})[field] = value.strip()
    return out


def _apply(base: Frozen, section: str, overrides: dict[str, Any]) -> Frozen:
    try:
        return type(base).model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:
        raise InvalidSpec(f"bad setting: {describe_errors(err, section)}") from None


def build_run_spec(
    repos: Sequence[str],
    *,
    name: str | None = None,
    preset: str | None = None,
    sets: Iterable[str] = (),
    corpus_overrides: dict[str, Any] | None = None,
    init_from: str | None = None,
    cwd: Path | None = None,
    init_model: ModelConfig | None = None,
) -> RunSpec:
    """Resolve one run's spec: preset, then `--set`, validated as a whole.

    `init_model`, the network of the run `init_from` names: a fine-tuned run keeps it (only its
    dropout is this run's choice), so an architecture set here that differs is refused.
    """
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise InvalidSpec(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if not repos:
        raise InvalidSpec("no repo given: pass --repo owner/name (or a URL or a local path)")
    parsed = tuple(parse_repo_spec(r, cwd=cwd) for r in repos)
    model, train = PRESETS[preset]
    sections: dict[str, Frozen] = {
        "model": model, "train": train, "corpus": CorpusConfig(), "sample": SampleConfig()
    }
    overrides = parse_sets(sets)
    if corpus_overrides:
        overrides.setdefault("corpus", {}).update(corpus_overrides)
    for section, values in overrides.items():
        sections[section] = _apply(sections[section], section, values)
    if init_model is not None:
        chosen = cast(ModelConfig, sections["model"])
        kept = init_model.model_copy(update={"dropout": chosen.dropout})
        clash = sorted(k for k in overrides.get("model", {})
                       if k != "dropout" and getattr(chosen, k) != getattr(kept, k))
        if clash:
            raise InvalidSpec(
                f"--init-from {init_from} keeps that run's network ({kept.num_layers}x{kept.rnn_size} {kept.model}): "
                f"drop --set {', '.join(f'{k}={getattr(chosen, k)}' for k in clash)}"
            )
        sections["model"] = kept
    return RunSpec(
        name=name or "+".join(r.location.rstrip("/").rsplit("/", 1)[-1] for r in parsed),
        repos=parsed,
        preset=preset,
        init_from=init_from,
        **sections,  # type: ignore[arg-type]
    )
