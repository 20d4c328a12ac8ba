"""export-check on the case mlx-lm users report most (mlx-lm#1172, mlx-examples#832): an
adapter on a 4-bit MLX base, fused by ``python -m mlx_lm fuse``, which re-quantizes the
fused weights unless given ``--dequantize``. In low precision a + b = a when b is small.

The 4-bit base is SmolLM2-135M through ``python -m mlx_lm convert -q``. Training on a
4-bit base is slow on a CPU, so the strong adapter is the session's cached mlx-lm
adapter (trained on the float base; live on the 4-bit one it is a QLoRA adapter like any
other) and the light one is the same with its B scaled by 0.2, no training. Expected:
the light adapter fused and re-quantized FAILs naming the modules that lost the delta,
fused with ``--dequantize`` it PASSes, and the strong one re-quantized PASSes;
``--weights-only`` gives the same verdicts in under 5 s each.
"""

from __future__ import annotations

from pathlib import Path

import mlx_lm  # noqa: E402, F401  (the mlx extra: a missing one is a failure, not a skip)
import pytest
from click.testing import CliRunner  # noqa: E402

import sway_common.app.data  # noqa: E402
from sway_common.app.cli import app  # noqa: E402
from sway_common.models import normalize_config  # noqa: E402
from sway_common.report import load_json  # noqa: E402
from sway_common.types import Verdict  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.mlx]

PROMPTS_FILE = Path(sway_common.app.data.__file__).parent / "demo_prompts.txt"
LIGHT = 0.2
CASES = {  # (adapter, export) -> exit code
    ("light", "requant"): 1,
    ("light", "deq"): 0,
    ("strong", "requant"): 0,
}


def _light(adapter: Path, dst: Path) -> Path:
    from test_export_e2e import scaled_copy

    return scaled_copy(adapter, dst, LIGHT)


@pytest.fixture(scope="module")
def qlora(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from test_export_e2e import _mlx_lm
    from test_mlx_e2e import smollm2_trained_adapter

    root = tmp_path_factory.mktemp("qlora")
    _mlx_lm(
        "convert",
        "--hf-path",
        str(normalize_config(smollm2_dir)),
        "-q",
        "--mlx-path",
        str(root / "q4"),
    )
    adapters = {
        "strong": smollm2_trained_adapter(smollm2_dir, tmp_path_factory),
        "light": _light(smollm2_trained_adapter(smollm2_dir, tmp_path_factory), root / "light"),
    }
    exports = {}
    for kind, export in CASES:
        flags = ["--dequantize"] if export == "deq" else []
        dst = root / f"{kind}-{export}"
        _mlx_lm(
            "fuse",
            "--model",
            str(root / "q4"),
            "--adapter-path",
            str(adapters[kind]),
            *flags,
            "--save-path",
            str(dst),
        )
        exports[kind, export] = dst
    return root / "q4", adapters, exports


def _invoke(qlora, case, tmp_path: Path, *extra: str):
    base, adapters, exports = qlora
    out = tmp_path / "r.json"
    args = ["export-check", "--model", str(base), "--adapter-path", str(adapters[case[0]])]
    args += ["--export", str(exports[case]), "--prompts", str(PROMPTS_FILE), "--backend", "mlx"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), *extra])
    print(f"\n[{'-'.join(case)} {' '.join(extra)}] exit {result.exit_code}\n{result.output}")
    return result, load_json(out)


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c) for c in CASES])
def test_weights_only_verdicts_in_seconds(qlora, case, tmp_path: Path) -> None:
    result, report = _invoke(qlora, case, tmp_path, "--weights-only", "-q")
    assert result.exit_code == CASES[case], result.output
    assert report.meta["duration_s"] < 5.0
    evidence = report.probes[0].evidence
    if case == ("light", "requant"):
        assert evidence["retained"] < 0.5 and len(evidence["lost"]) > 0
        assert evidence["lost"][0] in result.output and "--dequantize" in result.output
    else:
        assert evidence["retained"] > 0.9


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c) for c in CASES])
def test_forward_verdicts(qlora, case, tmp_path: Path) -> None:
    result, report = _invoke(qlora, case, tmp_path, "--runs", "6")
    assert result.exit_code == CASES[case], result.output
    probes = {p.name: p for p in report.probes}
    nt = probes["export_next_token"]
    assert probes["adapter_effect"].verdict is Verdict.PASS
    assert nt.evidence["noise_floor"] is not None  # the floor's models were measured
    assert probes["export_kl"].evidence["ft_export"]["pooled"]["positions"] > 100
    if case == ("light", "requant"):
        assert report.verdict is Verdict.FAIL and nt.verdict is Verdict.FAIL
        lost = probes["weight_delta"].evidence["lost"]
        assert lost and lost[0] in report.meta["headline"], report.meta["headline"]
    else:
        assert report.verdict is Verdict.PASS, report.meta["headline"]
