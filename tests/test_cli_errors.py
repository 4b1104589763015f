"""The command line's behaviour when its environment fails: a closed pipe, Ctrl-C, an output it cannot write."""

import subprocess
import sys
from pathlib import Path

from nosasim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "samples" / "smollm2-argparse-8k.nosatrace"


def test_closed_pipe_is_not_a_traceback():
    """`nosasim ... | head`: the reader closes the pipe before the command writes; the command ends quietly."""
    code = "import sys; from nosasim.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "trace", "info", str(TRACE)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # before the child has imported anything, let alone written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import nosasim.trace.synth as synth

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "synthesize", interrupted)
    out = tmp_path / "t.nosatrace"
    assert main(["trace", "synth", "--kind", "random", "--layers", "1", "--heads", "1", "--steps", "2", "--k", "4",
                 "--context", "2000", "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_version(capsys):
    import pytest

    from nosasim import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"nosasim {__version__}"


def test_json_outputs_carry_provenance(capsys):
    """replay, compare and cache JSON name the nosasim, the trace file (with its hash) and the profile."""
    import json

    from nosasim import __version__
    from nosasim.provenance import file_sha256

    sha = file_sha256(TRACE)
    runs = {"replay": ["replay", str(TRACE), "--batch", "2", "--json", "--profile", "h200-pcie5"],
            "cache": ["cache", str(TRACE), "--policy", "lru", "--capacity", "70", "--json"]}
    for name, argv in runs.items():
        assert main(argv) == 0
        prov = json.loads(capsys.readouterr().out)["provenance"]
        assert prov["nosasim"] == __version__ and prov["trace"] == str(TRACE) and prov["trace_sha256"] == sha
        if name == "replay":
            assert prov["profile"] == "h200-pcie5" and "H200" in prov["profile_device"]
