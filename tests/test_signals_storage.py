"""The shared helpers of the trainer and the eval runner: `signals.StopOnSignal` (a signal sets
a flag, the previous handlers come back) and `storage.atomic_open` (a file is replaced whole or
not at all)."""

import os
import signal

import pytest

from ee_mllm_jax import signals, storage


def test_a_signal_sets_the_flag_and_the_previous_handlers_come_back():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("outer"))
  try:
    with signals.StopOnSignal() as stop:
      assert not stop.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.requested and not seen
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == ["outer"]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_only_the_chosen_signals_and_a_second_interrupt_gives_up():
  before = signal.getsignal(signal.SIGINT)
  with signals.StopOnSignal((signal.SIGTERM,)):
    assert signal.getsignal(signal.SIGINT) is before  # SIGINT left alone
  with signals.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def test_an_atomic_write_replaces_the_file_whole_or_leaves_it(tmp_path):
  path = str(tmp_path / "f.json")
  storage.atomic_write(path, "old\n")
  with pytest.raises(RuntimeError):
    with storage.atomic_open(path) as f:
      f.write("half")
      raise RuntimeError("killed in the middle")
  assert open(path).read() == "old\n" and os.listdir(tmp_path) == ["f.json"]  # no .tmp left behind
  storage.atomic_write(path, b"new\n")
  assert open(path).read() == "new\n"
