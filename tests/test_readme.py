"""The README's plugin example runs as written."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fcl_bench.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_plugin_example_runs(tmp_path):
    text = README.read_text()
    start = text.index("# my_method.py")
    (tmp_path / "my_method.py").write_text(text[start:text.index("```", start)])
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["run", "--plugin", str(tmp_path / "my_method.py"), "--methods", "headavg",
                                    "--preset", "smoke", "--out", str(out), "-o", "foundation_pretrained=false",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "smoke" / "headavg" / "synthetic" / "seed42" / "metrics.json").read_text())
    assert len(metrics["acc"]) == 2 and metrics["bytes_up"] > 0
    assert set(metrics["wire"]["client_uploads"]["0"]) == {"weight", "bias", "n"}
