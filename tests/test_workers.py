"""benchmarks/workers.py: the seeds dealt to worker processes, each worker's command, and a failed
worker named with its log (real subprocesses running a stand-in script)."""

import json
import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import workers  # pylint: disable=g-import-not-at-top,wrong-import-position

# Writes its argv to work/argv_<seeds>.json; exits 3 when its seeds include 13.
STAND_IN = textwrap.dedent("""
    import json, os, sys
    argv = sys.argv[1:]
    seeds = argv[argv.index("--seeds") + 1]
    with open(os.path.join(os.environ["WORK"], f"argv_{seeds}.json"), "w") as f:
      json.dump(argv, f)
    print("worker", seeds)
    sys.exit(3 if "13" in seeds.split(",") else 0)
""")


@pytest.mark.parametrize("seeds,n,expected", [
    ((0, 1, 2), 3, [(0,), (1,), (2,)]),
    ((0, 1, 2), 2, [(0, 2), (1,)]),
    ((0, 1, 2), 8, [(0,), (1,), (2,)]),  # never an empty worker
    ((0, 1, 2, 3, 4), 2, [(0, 2, 4), (1, 3)]),
    ((5,), 3, [(5,)]),
    ((0, 1), 0, [(0, 1)]),
])
def test_seed_groups_deal_every_seed_once(seeds, n, expected):
  assert workers.seed_groups(seeds, n) == expected


def test_shown_args_drop_the_note_in_both_spellings():
  argv = ["--scale", "tiny", "--note", "beside the tests", "--sizes", "32,64", "--note=again"]
  assert workers.shown_args(argv) == ["--scale", "tiny", "--sizes", "32,64"]


@pytest.fixture
def script(tmp_path, monkeypatch):
  path = tmp_path / "stand_in.py"
  path.write_text(STAND_IN)
  monkeypatch.setenv("WORK", str(tmp_path))
  return str(path)


def test_each_worker_gets_its_seeds_and_the_shared_flags(script, tmp_path):
  argv = ["--scale", "tiny", "--seeds", "0,1,2", "--workers=2", "--out", "docs", "--note", "x", "--sizes", "32,64"]
  seconds = workers.run_cells(script, argv, (0, 1, 2), 2, str(tmp_path))
  assert seconds > 0
  for seeds in ("0,2", "1"):
    with open(tmp_path / f"argv_{seeds}.json") as f:
      got = json.load(f)
    # the parent's own flags are gone; its settings stay; the worker stops after the cells
    assert got == ["--scale", "tiny", "--sizes", "32,64", "--cells_only", "--out", str(tmp_path / "logs"),
                   "--seeds", seeds]
    assert (tmp_path / "logs" / f"seeds_{seeds.replace(',', '_')}.log").read_text() == f"worker {seeds}\n"


def test_one_worker_means_no_subprocess(script, tmp_path):
  assert workers.run_cells(script, [], (0, 1), 1, str(tmp_path)) == 0.0
  assert not list(tmp_path.glob("argv_*.json"))


def test_a_failed_worker_stops_the_run_naming_its_seeds_and_log(script, tmp_path):
  with pytest.raises(SystemExit) as e:
    workers.run_cells(script, [], (0, 13), 2, str(tmp_path))
  message = str(e.value)
  assert "seeds (13,) (exit 3)" in message and "seeds_13.log" in message and "worker 13" in message
  assert "seeds (0,)" not in message  # the one that succeeded is not blamed
  assert (tmp_path / "argv_0.json").exists()  # and it ran to the end
