"""The benchmarks run end to end on tiny sizes (`--smoke`), so a real run cannot die of a typo: the GPU check the
day a GPU is lent, the head sweep, the extraction throughput and the explanation evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.slow


def smoke(tmp_path, script: str, *args: str) -> dict:
    """The last line of a benchmark's --smoke run: its JSON figures."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--smoke"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gpu_check_smoke_runs_every_section_and_prints_its_figures(tmp_path):
    figures = smoke(tmp_path, "gpu_check.py", "--device", "cpu")
    for key in ("extract_images_per_s", "forward_images_per_s", "decode_images_per_s", "score_images_per_s",
                "grid_seconds", "tuned_loop_grid_seconds", "lora_steps_per_s", "full_steps_per_s",
                "cleandift_extract_images_per_s", "cleandift_forward_images_per_s"):
        assert figures[key] > 0, key
    assert figures["smoke"] is True and figures["grid_runs"] == 4


def test_smart_hyper_memory_smoke_trains_one_member_and_measures_its_peak(tmp_path):
    figures = smoke(tmp_path, "smart_hyper_memory.py")
    assert figures["parameters"] > 0 and figures["step_seconds"] > 0 and figures["peak_bytes"] > 0
    assert figures["bytes_per_parameter"] == figures["peak_bytes"] / figures["parameters"]


def test_head_sweep_smoke_times_all_three_loops_and_the_bounds(tmp_path):
    figures = smoke(tmp_path, "head_sweep.py")
    for key in ("naive_model_epochs_per_s", "tuned_model_epochs_per_s", "ours_model_epochs_per_s", "speedup_vs_tuned",
                "share_of_bound", "share_of_sequential_bound", "share_of_kernel_floor", "ours_trainer_seconds"):
        assert figures[key] > 0, key
    assert figures["runs"] == 36 and figures["ours_trainer_seconds"] < figures["ours_seconds"]


def test_extract_throughput_smoke_reports_both_limits_and_the_share_in_the_model(tmp_path):
    figures = smoke(tmp_path, "extract_throughput.py", "--device", "cpu")
    for key in ("naive_images_per_s", "extract_images_per_s", "score_images_per_s", "forward_images_per_s",
                "decode_images_per_s", "share_of_bound"):
        assert figures[key] > 0, key
    assert figures["bound"] in ("forward", "decode") and 0 < figures["share_of_run_in_model"] < 1


def test_explain_evaluate_smoke_times_the_per_step_loop_and_ours_on_equal_numbers(tmp_path):
    figures = smoke(tmp_path, "explain_evaluate.py")  # it exits non-zero where the two evaluations disagree
    for key in ("per_step_wall_seconds", "batched_wall_seconds", "speedup_wall", "speedup_cpu",
                "deletion_per_step_cpu_seconds", "deletion_batched_cpu_seconds", "deletion_speedup_wall"):
        assert figures[key] > 0, key
    assert figures["grids"] == 2 and figures["curves_per_grid"] * figures["steps"] == 36
