"""The command line explains itself: `--help` lists every command with its examples, `--version`,
every subcommand's `-h`, `list` and its sections, unknown commands named, the run's Hydra help."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import diffsampler
from diffsampler.cli import COMMANDS, LIST_SECTIONS, main

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_command_with_its_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert {"run", "report", "search", "list", "demo", "minority-classifier"} <= set(COMMANDS)
    for name, c in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
        assert c.examples, f"{name} has no example"
        for e in c.examples:
            assert f"$ {e}" in out
    assert "powered by Hydra" not in out and "--hydra-help" in out
    assert main(["-h"]) == 0 and capsys.readouterr().out == out


def test_version_is_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"diffsampler {diffsampler.__version__}"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in meta["dynamic"]  # one copy: setuptools reads diffsampler.__version__
    assert any(d.startswith("accelerate") for d in meta["dependencies"])


HYDRA_COMMANDS = ("run", "search")  # their --help is Hydra's: test_hydra_commands_show_their_own_help


@pytest.mark.parametrize("name", [n for n in COMMANDS if n not in HYDRA_COMMANDS])
def test_every_argparse_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: diffsampler {name}")
    for example in COMMANDS[name].examples if name != "minority-classifier" else ():
        assert example in out


def test_report_help_is_not_a_directory_and_bad_args_are_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["report"])  # the directory is required
    assert e.value.code == 2 and "usage: diffsampler report" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2  # a directory without results: one line, exit 2
    assert re.search(r"diffsampler report: error: no results.csv .*under", capsys.readouterr().err)


def test_unknown_command_is_named_with_a_suggestion(capsys):
    assert main(["reprot", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'reprot'" in err and "did you mean 'report'" in err


def test_list_prints_each_section_and_only_the_ones_asked(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for head in ("solvers (solver=<name>)", "solver aliases", "spacings (spacing=<name>)", "guidance (guidance=<name>)",
                 "shipped plans"):
        assert head in out, head
    assert "dpmpp_2m " in out and "'DPM++ 2M Karras'" in out and "karras" in out and "gmm_nfe5" in out
    assert main(["list", "plans"]) == 0
    plans = capsys.readouterr().out
    assert "gmm_nfe5             NFE 5" in plans and "solvers (" not in plans and "guidance (" not in plans
    with pytest.raises(SystemExit) as e:
        main(["list", "samplers"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown section 'samplers'" in err and all(s in err for s in LIST_SECTIONS)


def test_hydra_commands_show_their_own_help():
    """`run --help` and `search --help` are Hydra's help of their configs with diffsampler's header."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "diffsampler", name, "--help"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in HYDRA_COMMANDS}
    outs = {name: p.communicate(timeout=120) for name, p in procs.items()}
    for name, (out, err) in outs.items():
        assert procs[name].returncode == 0, err
        assert out.startswith(f"diffsampler {name}:") and "== Config ==" in out and "cli is powered" not in out
        assert "cli.log" in out
    assert "solver: " in outs["run"][0] and "dpmpp_2m" in outs["run"][0] and "nfe: 10" in outs["run"][0]
    assert "search:" in outs["search"][0]


def test_models_load_without_the_accelerate_warning():
    """accelerate is a dependency: diffusers loads the model with it instead of warning on every job
    ("Cannot initialize model with low cpu memory usage because `accelerate` was not found")."""
    import logging

    from diffsampler.eval.digits import load_digits_pipeline

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        load_digits_pipeline()
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "accelerate" in r.getMessage()]


def test_demo_takes_its_options_and_names_an_unknown_solver(capsys):
    assert main(["demo", "--solvers", "ddim", "dpmpp_3m", "--nfe", "4", "8", "--n", "64"]) == 0
    rows = {l.split()[0]: [float(v) for v in l.split()[1:]] for l in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"ddim", "dpmpp_3m"} and all(len(v) == 2 and v[1] < v[0] for v in rows.values())
    with pytest.raises(SystemExit) as e:
        main(["demo", "--solvers", "ddim", "nope"])
    assert e.value.code == 2 and "unknown solver 'nope'" in capsys.readouterr().err
