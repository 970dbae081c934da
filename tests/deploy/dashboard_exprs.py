#!/usr/bin/env python3
"""Print every PromQL expression of the Grafana dashboard, one per line.

The dashboard's template variables are replaced so that each line can be sent
as is to Prometheus' query API: $account and $policy_test (in any of Grafana's
spellings, such as ${account} or ${account:regex}) become `.*`, the value the
dashboard uses for "All". An expression spread over several lines is joined
into one. With --titles, each line is `panel title<TAB>expression`.

    python3 tests/deploy/dashboard_exprs.py [--titles] [DASHBOARD.json]

Exits 1 if an expression uses a variable this script does not know, so that
a new variable cannot slip through unsubstituted.
"""

import argparse
import json
import pathlib
import re
import sys

DEFAULT = (
    pathlib.Path(__file__).resolve().parents[2]
    / "dashboards"
    / "cloudflare-access-exporter.json"
)

# Variable name -> the value it takes for "All".
SUBSTITUTIONS = {"account": ".*", "policy_test": ".*"}

VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def panels(dashboard):
    """Yield every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard):
    """Yield (panel title, raw expression) for every target with an expr."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                yield panel.get("title", ""), expr


def substitute(expr):
    """Return expr on one line with the template variables replaced."""

    def replace(match):
        name = match.group(1) or match.group(2)
        if name not in SUBSTITUTIONS:
            raise KeyError(name)
        return SUBSTITUTIONS[name]

    return " ".join(VARIABLE.sub(replace, expr).split())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard", nargs="?", default=str(DEFAULT))
    parser.add_argument(
        "--titles", action="store_true", help="prefix each line with its panel title"
    )
    args = parser.parse_args()

    dashboard = json.loads(pathlib.Path(args.dashboard).read_text(encoding="utf-8"))
    for title, expr in expressions(dashboard):
        try:
            line = substitute(expr)
        except KeyError as unknown:
            print(
                f"panel {title!r}: unknown template variable ${unknown.args[0]}",
                file=sys.stderr,
            )
            return 1
        print(f"{title}\t{line}" if args.titles else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
