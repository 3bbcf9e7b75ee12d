"""The GPU check runs end to end on tiny sizes, so the day a GPU is lent it cannot die of a typo."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_check_smoke_runs_every_section_and_prints_its_figures(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--smoke"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("extract_images_per_s", "forward_images_per_s", "decode_images_per_s", "score_images_per_s",
                "grid_seconds", "tuned_loop_grid_seconds", "lora_steps_per_s", "full_steps_per_s",
                "cleandift_extract_images_per_s", "cleandift_forward_images_per_s"):
        assert figures[key] > 0, key
    assert figures["smoke"] is True and figures["grid_runs"] == 4
