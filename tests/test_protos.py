"""The committed gRPC code in pomona/proto/ is what protos/*.proto generate (else: `make protos`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "gen_protos.sh"), str(tmp_path)],
        check=True, env={"PATH": env_path}, timeout=120,
    )
    generated = sorted((tmp_path / "pomona" / "proto").glob("*_pb2*"))
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / "pomona" / "proto" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `make protos`"
        )
