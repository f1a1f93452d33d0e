"""The `handoff` command line. One module per command group; this one wires them together.

Every command takes --redis-url (env REDIS_URL), --config FILE, --preset NAME and --app MODULE.
"""

from __future__ import annotations

import logging
import sys

import click

from handoff.cli.common import CliState
from handoff.errors import ConfigError, HandoffError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=None,
    help="Server address (redis://, rediss://, unix://). Default: the embedded dev server.",
)
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="A TOML settings file."
)
@click.option("--preset", help="development | production | high_availability")
@click.option("--app", help="Module where your @agent functions are defined (e.g. workers.demo).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def main(ctx, redis_url, config_file, preset, app, log_level) -> None:
    """handoff: hand tasks between agents through Redis, fast, losing nothing."""
    ctx.obj = CliState(
        redis_url=redis_url,
        config_file=config_file,
        preset=preset,
        app=app,
        log_level=log_level,
    )


def _register() -> None:
    from handoff.cli import commands

    for command in commands.ALL:
        main.add_command(command)


_register()


def run() -> None:
    """Entry point that turns handoff errors into one line on stderr and exit status 2."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except (HandoffError, ConfigError) as e:
        logging.getLogger("handoff").debug("failed", exc_info=True)
        click.echo(f"handoff: error: {e}", err=True)
        sys.exit(2)
