"""bench/gpu.py, the one-run GPU benchmark, on the CPU with tiny sizes: it runs to the end and prints
every figure with a sensible value (a GPU run uses the same code with bigger sizes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def figures(stdout: str) -> dict[str, list[str]]:
    """`name: value unit -- note` lines -> {name: [value, unit...]}; `#` lines are comments."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("#") or ": " not in line:
            continue
        name, _, rest = line.partition(": ")
        out[name] = rest.split(" -- ")[0].split()
    return out


def test_gpu_bench_on_cpu_prints_every_figure(tmp_path):
    js = tmp_path / "figures.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--small",
                        "--out-json", str(js)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout
    f = figures(r.stdout)

    def value(name, unit=None) -> float:
        assert name in f, f"no figure {name!r} in the output:\n{r.stdout}"
        if unit is not None:
            assert f[name][1:] == [unit], f"{name}: {f[name]}"
        return float(f[name][0])

    assert f["device"] == ["cpu"] and value("CPUs", "cores") >= 1
    assert 0 < value("MFNet per clip (4x32x32)", "GMAC") < 2.9    # 2.90 GMAC at 16x112x112
    for prec in ("fp32", "bf16"):
        assert value(f"dense conv3d 256->256 3x3x3 {prec}", "GFLOP/s") > 0
        assert value(f"forward {prec} batch 2 channels_last", "clips/s") > 0

    cpus = os.cpu_count() or 1
    default = min(8, cpus)
    assert value(f"extract fp32 batch 2 workers {default}", "clips/s") > 0
    assert value(f"extract fp32 batch 2 workers {default} vs forward only", "x") > 0
    swept = sorted({t for t in (1, 2) if t <= cpus} | {default})
    for w in swept:
        assert value(f"extract fp32 batch 2 workers {w}", "clips/s") > 0
        assert value(f"extract fp32 batch 2 workers {w} per decoding process", "clips/s/process") > 0
    assert value("extract fp32 batch 2 fewest workers within 90% of best", "processes") in swept

    # same precision, same numbers: the library's BatchForward and the bench's own forward
    for prec in ("fp32", "bf16"):
        assert value(f"pooled cosine min, BatchForward cpu {prec} vs bench forward cpu {prec}") >= 0.99
    assert value("pooled cosine min, cpu bf16 vs cpu fp32") >= 0.9
    assert value("max abs difference, BatchForward cpu fp32 batches in flight vs one at a time") == 0

    assert value("predict on cpu", "s") > 0 and f["predict ran on"] == ["cpu"]

    assert value("episode_loss circle on cpu vs device-side loss, abs diff") < 1e-5
    assert value("train lstm on cpu", "episodes/s") > 0
    for head in ("lstm", "mean"):
        assert value(f"eval {head} on cpu", "episodes/s") > 0
        assert value(f"eval {head} on cpu (library episode_accuracies)", "episodes/s") > 0
        assert value(f"eval {head}, cpu vs cpu library, episodes with equal accuracy", "%") == 100

    assert value("library train lstm on cpu", "episodes/s") > 0
    for head in ("lstm", "otam"):
        assert value(f"library eval {head} on cpu", "s") > 0

    saved = json.loads(js.read_text())
    assert saved["failed"] == [] and set(saved["figures"]) == set(f)
    assert saved["figures"]["train lstm on cpu"]["unit"] == "episodes/s"
