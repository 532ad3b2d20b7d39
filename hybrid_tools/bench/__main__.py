from .session import cli

raise SystemExit(cli())
