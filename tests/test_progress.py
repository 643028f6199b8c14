"""Progress lines: counts, percentages, time spent and left, at most one line per interval."""

import io

from crystal_vae import progress


def test_progress_lines_say_counts_and_time_left(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
  stream = io.StringIO()
  counter = progress.Progress("evaluate: rebuilt", 40, every=10.0, stream=stream)
  now[0] = 105.0
  counter.advance(10)  # 5 s after the start: too soon for a line
  now[0] = 112.0
  counter.advance(10)  # 20 of 40 in 12 s: 12 s left
  now[0] = 114.0
  counter.advance(10)  # 2 s after the last line: none
  now[0] = 190.0
  counter.advance(10)  # done: always a line
  assert stream.getvalue().splitlines() == [
      "evaluate: rebuilt 20/40 crystals (50%), 12 s, about 12 s left",
      "evaluate: rebuilt 40/40 crystals (100%), 1 min 30 s",
  ]


def test_durations_read_as_a_person_writes_them():
  assert [progress.format_duration(s) for s in (0.4, 59, 61, 3599, 3720)] == [
      "0 s", "59 s", "1 min 1 s", "59 min 59 s", "1 h 2 min"]


def test_an_unknown_total_gives_the_count_so_far(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
  stream = io.StringIO()
  counter = progress.Progress("csv: reading train", 0, unit="entries", every=10.0, stream=stream)
  for second in range(1, 26):
    now[0] = float(second)
    counter.advance(100)
  assert stream.getvalue().splitlines() == ["csv: reading train 1000 entries, 10 s",
                                            "csv: reading train 2000 entries, 20 s"]
