"""The ``latent-dmmd`` command line: the README's main command on a tiny setting, clear errors."""

import json
import subprocess
import sys

from latent_dmmd.cli import main


def test_demo_writes_png_and_metrics(tmp_path, capsys):
    out = tmp_path / "toy.png"
    assert main(["demo", "--output", str(out), "--train-steps", "10", "--num-particles", "64"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "toy.json").read_text())
    assert metrics["flow_steps_total"] == 100 and metrics["config"]["train_steps"] == 10
    assert "energy distance" in capsys.readouterr().out


def test_missing_output_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "nope" / "x.png"), "--train-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder does not exist" in err[0]


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "latent_dmmd.cli", "demo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--train-steps" in proc.stdout and "default" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "latent_dmmd.cli", "demo", "--train-steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
