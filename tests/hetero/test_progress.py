import io

from hetero._progress import LOG_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_logs_get_one_line_per_stage_and_terminals_live_ones():
    bars = {}
    for name, stream in (("log", io.StringIO()), ("terminal", Terminal())):
        with progress_bar(total=10_000, file=stream, unit="img", desc="embed") as bar:
            for _ in range(100):
                bar.update(100)
        bars[name] = (bar, stream.getvalue())
    assert bars["log"][0].mininterval == LOG_INTERVAL_S and bars["terminal"][0].mininterval < 1
    log = bars["log"][1]
    assert log.count("\n") == 1 and "\r" not in log and " 0%|" not in log  # no 0% line: the final state only
    assert log.startswith("embed: 100%") and "10000/10000" in log
    assert bars["terminal"][1].startswith("\rembed:   0%")  # a terminal shows the bar at once, redrawn in place


def test_a_log_bar_that_is_not_left_still_leaves_its_line_and_quiet_leaves_none():
    stream = io.StringIO()
    bar = progress_bar(range(3), file=stream, desc="formats", leave=False)
    assert list(bar) == [0, 1, 2]
    assert stream.getvalue().count("\n") == 1 and "3/3" in stream.getvalue()
    bar.close()  # closing twice writes nothing more
    assert stream.getvalue().count("\n") == 1
    quiet = io.StringIO()
    for _ in progress_bar(range(3), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""


def test_a_long_stage_logs_whole_lines_at_the_interval(monkeypatch):
    import hetero._progress as P

    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)
    stream = io.StringIO()
    with progress_bar(total=3, file=stream, desc="train") as bar:
        for _ in range(3):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("train:") for line in lines) and "\r" not in stream.getvalue()
