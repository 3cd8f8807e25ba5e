import io

from hetero._progress import LOG_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_logs_get_sparse_refreshes_and_terminals_live_ones():
    bars = {}
    for name, stream in (("log", io.StringIO()), ("terminal", Terminal())):
        with progress_bar(total=10_000, file=stream, unit="img") as bar:
            for _ in range(100):
                bar.update(100)
        bars[name] = (bar, stream.getvalue())
    assert bars["log"][0].mininterval == LOG_INTERVAL_S and bars["terminal"][0].mininterval < 1
    log = bars["log"][1]
    assert log.count("\r") <= 3 and "10000/10000" in log  # the first and final states only
