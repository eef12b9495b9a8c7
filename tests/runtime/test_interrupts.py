"""tccli.runtime.interrupts: SIGINT/SIGTERM become Interrupted at once, or at the next clean point inside deferred().

Real signals, sent to this process with the handlers installed for the test only. The commands' behaviour
under signals (exit codes, the one line, resumable files) is tested with real `tc` processes in
tests/test_bad_inputs.py and tests/test_train.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from tccli.runtime import interrupts


@pytest.fixture()
def handlers():
    saved = {signum: signal.getsignal(signum) for signum in interrupts.SIGNALS}
    state = dict(interrupts._state)
    interrupts.install()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    interrupts._state.clear()
    interrupts._state.update(state)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_interrupted_with_the_shell_exit_code(handlers, signum, code):
    with pytest.raises(interrupts.Interrupted) as caught:
        os.kill(os.getpid(), signum)
        for _ in range(10**6):  # the handler runs between two bytecodes
            pass
    assert caught.value.signum == signum and caught.value.exit_code == code
    assert not isinstance(caught.value, Exception)  # `except Exception` blocks let it through


def test_deferred_signals_wait_for_the_clean_point(handlers):
    reached = []
    with pytest.raises(interrupts.Interrupted) as caught:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**5):
                pass
            reached.append("after the signal")  # not interrupted inside the block
            assert interrupts.pending() == signal.SIGTERM
            raise interrupts.take("stopped at step 3 of 9 with a checkpoint")
    assert reached == ["after the signal"]
    assert caught.value.signum == signal.SIGTERM and caught.value.detail.startswith("stopped at step 3")
    assert interrupts.pending() is None


def test_a_signal_still_pending_at_the_end_of_the_block_is_raised_there(handlers):
    with pytest.raises(interrupts.Interrupted):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**5):
                pass
    assert interrupts.pending() is None


def test_nothing_pending_nothing_raised(handlers):
    with interrupts.deferred():
        pass
    interrupts.raise_pending()


class _SignalledWhileFinalised:
    """An object whose finaliser is interrupted by SIGTERM: the handler's Interrupted raised inside
    ``__del__`` is printed as "Exception ignored" by Python, and the code that dropped the object goes on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between two bytecodes, inside this finaliser
            pass


def test_a_signal_lost_in_a_finaliser_still_stops_the_outputs(handlers, tmp_path):
    from tccli.runtime import outputs

    _SignalledWhileFinalised()  # dropped at once: its finaliser swallows the Interrupted
    assert interrupts.swallowed() == signal.SIGTERM
    with pytest.raises(interrupts.Interrupted) as caught:
        outputs.atomic_write_text(tmp_path / "out.txt", "written after the signal")
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary file


def test_no_signal_nothing_swallowed(handlers, tmp_path):
    from tccli.runtime import outputs

    assert interrupts.swallowed() is None
    outputs.atomic_write_text(tmp_path / "out.txt", "x")
    assert (tmp_path / "out.txt").read_text() == "x"
