"""The collector's pause (bitnet_core/gcpause.py): no collection inside, the previous state after, and a pause
that ends frozen only in a process that runs one command (the command line on its own argv), never in a caller
that runs the CLI in-process (tests, other programs)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bitnet_convert.cli import main
from bitnet_core import gcpause


@pytest.fixture
def collector():
    """The collector's state, the freeze flag and the frozen objects as they were, after the test."""
    was_enabled, was_flag, was_frozen = gc.isenabled(), gcpause._freeze_after, gc.get_freeze_count()
    yield
    gcpause._freeze_after = was_flag
    if gc.get_freeze_count() > was_frozen:
        gc.unfreeze()
    (gc.enable if was_enabled else gc.disable)()


def test_pause_disables_then_restores(collector):
    gc.enable()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause keeps the outer one
    assert gc.isenabled()
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()  # a collector that was off stays off


def test_pause_leaves_the_objects_collectable_by_default(collector):
    gcpause._freeze_after = False
    frozen = gc.get_freeze_count()
    with gcpause.paused():
        made = [[i] for i in range(1000)]
    assert gc.get_freeze_count() == frozen
    assert gc.is_tracked(made)


def test_pause_ends_frozen_after_freeze_after_pauses(collector):
    gcpause.freeze_after_pauses()
    frozen = gc.get_freeze_count()
    with gcpause.paused():
        made = [[i] for i in range(1000)]
    assert gc.get_freeze_count() >= frozen + len(made)  # the list and its 1000 lists, at least


def test_cli_in_process_does_not_freeze(collector):
    gcpause._freeze_after = False
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert gcpause._freeze_after is False


def test_cli_on_its_own_command_line_freezes():
    probe = ("import sys; from bitnet_convert.cli import main; from bitnet_core import gcpause\n"
             "sys.argv = ['bitnet-convert', '--version']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(gcpause._freeze_after)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"
