"""What benchmarks/scaling.py and benchmarks/failover.py share, kept in one place so the
two reports stay comparable: the import path, the supervisor on the bench agents, the
interleaved repeat loop with its progress lines, medians, machine facts and the command-line
tail (run, print the report, --json, exit code).

Runs in: those benchmark processes (`python -m benchmarks.scaling` from the project root).
Where handoff.bench or benchmarks.e2e already has the helper (medians, the CPU model, the
interrupt handler), it is used from there rather than copied.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.e2e import cpu_model
from benchmarks.e2e import medians as _medians
from benchmarks.pages import write_generated
from handoff.bench.interleave import (
    repeat_interleaved,  # noqa: F401 (re-exported)
    stop_signals_interrupt,
)
from handoff.connection.embedded_server import find_server_binary
from harness.procs import HandoffProcess, handoff_env

ROOT = Path(__file__).resolve().parent.parent

STOP_TIMEOUT_S = 10.0


class RunFailed(RuntimeError):
    """One run or trial could not be measured: reported in its row, the others go on."""


# -- the supervisor --------------------------------------------------------------------------


def start_supervisor(
    url: str,
    agents: dict[str, int],
    log_path: Path,
    bench_env: dict[str, str],
    app: str = "benchmarks.agents",
    **settings: object,
) -> HandoffProcess:
    """`handoff supervise` on the agents of benchmarks/agents.py (or `app`). `settings`
    become HANDOFF_* variables (procs.handoff_env); `bench_env` (BENCH_*_DIR) is added as is."""
    env = handoff_env(url, app=app, **settings)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "core"), str(ROOT)])
    env.update(bench_env)
    spec = ",".join(f"{name}={n}" for name, n in agents.items())
    return HandoffProcess(["supervise", "--agents", spec], env, log_path)


def check_alive(proc: HandoffProcess) -> None:
    """Raise RunFailed, with the end of its log, if the supervisor has exited."""
    if proc.proc.poll() is not None:
        raise RunFailed(f"supervisor exited with {proc.proc.returncode}: {proc.output()[-800:]}")


def stop_supervisor(proc: HandoffProcess, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM (graceful), then make sure the whole session is gone; the exit code."""
    code = None
    with contextlib.suppress(ProcessLookupError):
        if proc.proc.poll() is None:
            proc.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout_s)
        else:
            code = proc.proc.returncode
    proc.stop()
    return code


# -- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary folder for the logs, with SIGTERM and SIGHUP raising KeyboardInterrupt
    meanwhile (so every `finally` stops what it started). Removed after a clean run unless
    `keep`; otherwise its path is printed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    ok = False
    try:
        with stop_signals_interrupt():
            yield tmp
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


def medians(items: list[dict], spread: tuple[str, ...] = ()) -> dict[str, float]:
    """benchmarks.e2e.medians over the numeric figures only (flags and None, "did not happen",
    left out), plus <key>_min and <key>_max for the keys in `spread`."""
    numeric = [
        {k: v for k, v in item.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for item in items
    ]
    out = _medians(numeric)
    for key in spread:
        values = [n[key] for n in numeric if key in n]
        if values:
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def summarize(
    results: dict, group: str, noun: str, started: float, spread: tuple[str, ...] = ()
) -> dict:
    """Wall time since `started` and every entry's medians, into `results`; returns it."""
    results["meta"]["elapsed_s"] = time.monotonic() - started
    for entry in results[group].values():
        entry["median"] = medians(entry[f"{noun}s"], spread)
    return results


def machine_info(with_cpu: bool = False, **extra: object) -> dict:
    """The machine and server facts a report header starts from, then `extra`."""
    binary = find_server_binary()
    server = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    info: dict = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    if with_cpu:
        info["cpu"] = cpu_model()
    info.update(
        cores=os.cpu_count(),
        load_avg_at_start=os.getloadavg(),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        server=server,
    )
    return {**info, **extra}


# -- the command line ------------------------------------------------------------------------


def new_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser, described by the first paragraph of `doc`, with the shared --json."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    return parser


def finish(
    run: Callable[[], dict],
    render: Callable[[dict], str],
    json_path: Path | None,
    group: str | None = None,
    noun: str = "",
    page: tuple[Path | None, str] = (None, ""),
) -> int:
    """Run, print the report, write the figures to `json_path` and, when page's folder is
    given, the report into its benchmarks.md under page's section name. Exit code: 130
    when interrupted, 1 when an entry of `group` has no figures at all, else 0."""
    try:
        results = run()
    except KeyboardInterrupt:
        print("interrupted: every server and worker started has been stopped", file=sys.stderr)
        return 130
    text = render(results)
    print(text)
    out_dir, section = page
    if out_dir is not None:
        write_generated(out_dir / "benchmarks.md", section, text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {json_path}", file=sys.stderr)
    if group is None:
        return 0
    return 0 if all(e[f"{noun}s"] for e in results[group].values()) else 1
