"""`export-check --weights-only` end to end on SmolLM2-135M: the adapter trained by mlx-lm
(as in ``test_export_e2e.py``), fused by ``python -m mlx_lm fuse``, re-quantized to 4 bits
by ``python -m mlx_lm convert -q``, and the base (dir, and the GGUF it came from) passed
off as the export.

The finding: the 4-bit export's weights still carry the adapter's ΔW (the share survives
rounding on average) and change those very weights by about 0.4× its size: what 4-bit
storage does to any delta of that size (the noise floor), not more.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

from click.testing import CliRunner  # noqa: E402

from sway_common.app.cli import app  # noqa: E402
from sway_common.models import normalize_config, smollm2_gguf_path  # noqa: E402
from sway_common.report import load_json  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.mlx]


@pytest.fixture(scope="module")
def exports(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from test_export_e2e import _mlx_lm
    from test_mlx_e2e import smollm2_trained_adapter

    adapter = smollm2_trained_adapter(smollm2_dir, tmp_path_factory)
    root = tmp_path_factory.mktemp("weight_exports")
    model = str(normalize_config(smollm2_dir))
    _mlx_lm(
        "fuse", "--model", model, "--adapter-path", str(adapter), "--save-path", str(root / "f")
    )
    _mlx_lm("convert", "--hf-path", str(root / "f"), "--mlx-path", str(root / "q4"), "-q")
    paths = {"fused": root / "f", "fused-4bit": root / "q4", "base": smollm2_dir}
    return adapter, {**paths, "base-gguf": smollm2_gguf_path()}


@pytest.mark.parametrize(
    ("label", "code"), [("fused", 0), ("fused-4bit", 0), ("base", 1), ("base-gguf", 1)]
)
def test_weights_only_on_smollm2(label: str, code: int, exports, smollm2_dir, tmp_path) -> None:
    adapter, paths = exports
    out = tmp_path / "r.json"
    args = ["export-check", "--model", str(smollm2_dir), "--adapter-path", str(adapter)]
    args += ["--export", str(paths[label]), "--weights-only", "--json", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    print(f"\n[{label}] exit {result.exit_code}: {result.output.strip()}")
    assert result.exit_code == code, result.output
    evidence = load_json(out).probes[0].evidence
    if label == "fused":
        assert evidence["retained"] == pytest.approx(1.0, abs=1e-3)
    elif label == "fused-4bit":
        assert evidence["storage"] == "4-bit (group 64)" and evidence["retained"] > 0.95
        # Its own changes are the format's: what storing a random delta of this size
        # 4-bit does (the noise floor), not more.
        assert evidence["off_delta"] > 0.2 and evidence["off_delta"] <= evidence["floor_upper"]
        assert "are the format's" in result.output
    else:
        assert evidence["retained"] == pytest.approx(0.0, abs=1e-6)
        assert "do not carry" in result.output
