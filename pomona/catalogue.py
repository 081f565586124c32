"""The built-in catalogue of Apple Silicon machines and link kinds (pomona/data/machines.yaml).

Owns reading that file into frozen `Machine` and `LinkKind` records, and looking them up by name
(`machine`, `link_kind`) with an error that lists the known names. The figures and their sources
live in the YAML; this module only checks that each entry is complete. No MLX, no I/O beyond the
packaged data file (read once, through importlib.resources).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from pomona.errors import ConfigError

_DATA_FILE = "machines.yaml"
GB = 10**9  # memory bandwidth is quoted in GB/s, 1e9 bytes per second


@dataclass(frozen=True)
class Machine:
    """One buyable Mac configuration; power figures carry where they came from."""

    name: str
    short_name: str  # prefix of generated node names ("m3ultra" -> m3ultra-1, m3ultra-2)
    chip: str
    memory_gb: tuple[int, ...]  # the memory options (Apple "GB" are GiB)
    default_memory_gb: int
    memory_bandwidth_gbs: float
    gpu_fp16_tflops: float
    idle_w: float
    max_w: float
    power_kind: str  # "official" (Apple wall figures) or "estimate"
    power_basis: str
    links: tuple[str, ...]  # link kinds this machine can use
    sources: tuple[str, ...]  # URLs / notes its figures come from

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * GB

    @property
    def gpu_fp16_flops_per_s(self) -> float:
        return self.gpu_fp16_tflops * 1e12


@dataclass(frozen=True)
class LinkKind:
    """One kind of node-to-node link, as TCP/gRPC traffic sees it."""

    name: str
    latency_s: float  # one way
    latency_p90_s: float
    bandwidth_bytes_per_s: float
    kind: str  # "measured", "secondary" or "estimate"
    basis: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Catalogue:
    machines: dict[str, Machine]
    links: dict[str, LinkKind]
    sources: dict[str, str]  # tag -> URL and note


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key} must be a non-empty string")
    return value


def _number(entry: dict[str, Any], key: str, where: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{where}.{key} must be a positive number")
    return float(value)


def _tags(entry: dict[str, Any], key: str, where: str, known: dict[str, str]) -> tuple[str, ...]:
    tags = entry.get(key)
    if not isinstance(tags, list) or not tags:
        raise ValueError(f"{where}.{key} must be a non-empty list")
    unknown = [tag for tag in tags if tag not in known]
    if unknown:
        raise ValueError(f"{where}.{key} names sources missing from `sources:`: {unknown}")
    return tuple(f"{tag}: {known[tag]}" for tag in tags)


def _machine(name: str, entry: dict[str, Any], links: dict[str, LinkKind], known: dict[str, str]) -> Machine:
    where = f"machines.{name}"
    memory = entry.get("memory_gb")
    if not isinstance(memory, list) or not memory or not all(isinstance(m, int) for m in memory):
        raise ValueError(f"{where}.memory_gb must be a list of whole GB")
    default = int(_number(entry, "default_memory_gb", where))
    if default not in memory:
        raise ValueError(f"{where}.default_memory_gb {default} is not one of memory_gb {memory}")
    power = entry.get("power")
    if not isinstance(power, dict) or power.get("kind") not in ("official", "estimate"):
        raise ValueError(f"{where}.power needs idle_w, max_w, kind (official/estimate) and basis")
    machine_links = entry.get("links")
    if not isinstance(machine_links, list) or not machine_links:
        raise ValueError(f"{where}.links must be a non-empty list of link kinds")
    for link in machine_links:
        if link not in links:
            raise ValueError(f"{where}.links names {link!r}, which `links:` does not define")
    return Machine(
        name=name,
        short_name=_text(entry, "short_name", where),
        chip=_text(entry, "chip", where),
        memory_gb=tuple(memory),
        default_memory_gb=default,
        memory_bandwidth_gbs=_number(entry, "memory_bandwidth_gbs", where),
        gpu_fp16_tflops=_number(entry, "gpu_fp16_tflops", where),
        idle_w=_number(power, "idle_w", f"{where}.power"),
        max_w=_number(power, "max_w", f"{where}.power"),
        power_kind=power["kind"],
        power_basis=_text(power, "basis", f"{where}.power"),
        links=tuple(machine_links),
        sources=_tags(entry, "sources", where, known),
    )


def _link(name: str, entry: dict[str, Any], known: dict[str, str]) -> LinkKind:
    where = f"links.{name}"
    kind = entry.get("kind")
    if kind not in ("measured", "secondary", "estimate"):
        raise ValueError(f"{where}.kind must be measured, secondary or estimate")
    return LinkKind(
        name=name,
        latency_s=_number(entry, "latency_s", where),
        latency_p90_s=_number(entry, "latency_p90_s", where),
        bandwidth_bytes_per_s=_number(entry, "bandwidth_bytes_per_s", where),
        kind=kind,
        basis=_text(entry, "basis", where),
        sources=_tags(entry, "sources", where, known),
    )


def parse_catalogue(text: str) -> Catalogue:
    """The catalogue from machines.yaml text; ValueError names the first incomplete entry."""
    document = yaml.safe_load(text)
    if not isinstance(document, dict):
        raise ValueError("the catalogue must be a mapping with sources, machines and links")
    known = {str(tag): str(note) for tag, note in (document.get("sources") or {}).items()}
    links = {str(name): _link(str(name), entry, known) for name, entry in document["links"].items()}
    machines = {
        str(name): _machine(str(name), entry, links, known) for name, entry in document["machines"].items()
    }
    return Catalogue(machines, links, known)


@cache
def catalogue() -> Catalogue:
    """The packaged catalogue, read once."""
    text = resources.files("pomona").joinpath("data", _DATA_FILE).read_text(encoding="utf-8")
    try:
        return parse_catalogue(text)
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        # A broken packaged file is a bug in Pomona, not in the user's input.
        raise RuntimeError(f"pomona/data/{_DATA_FILE} is invalid: {error}") from None


def _unknown(what: str, name: object, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown {what} {name!r}; {hint}known {what}s: {', '.join(known)}")


def machine_names() -> list[str]:
    return list(catalogue().machines)


def link_kind_names() -> list[str]:
    return list(catalogue().links)


def machine(name: str) -> Machine:
    """The catalogue's machine `name`; ConfigError listing the known names otherwise."""
    machines = catalogue().machines
    if not isinstance(name, str) or name not in machines:
        raise _unknown("machine", name, list(machines))
    return machines[name]


def link_kind(name: str) -> LinkKind:
    """The catalogue's link kind `name`; ConfigError listing the known kinds otherwise."""
    links = catalogue().links
    if not isinstance(name, str) or name not in links:
        raise _unknown("link kind", name, list(links))
    return links[name]
