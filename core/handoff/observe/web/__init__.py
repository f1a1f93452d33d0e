"""The monitor's dashboard: pages, live updates and guarded actions in a browser.

Runs in: `handoff monitor --web ADDR`, and only there: nothing else imports this package,
so starlette, uvicorn and jinja2 (the `web` extra) are loaded only when --web is given.

    server.py   binds the address, runs uvicorn in a thread beside the monitor loop
    hub.py      one build per watched page per tick, fanned out to every viewer (SSE)
    reads.py    the reads a page needs beyond the monitor's snapshot (agent, task, run)
    pages.py    each page's regions, built from the snapshot and those reads
    render.py   the Jinja environment (autoescape on) and the display filters
    chart.py    the throughput history and its SVG lines
    guard.py    token, same-origin and size checks; security headers; one-line errors
    app.py      the routes
"""
