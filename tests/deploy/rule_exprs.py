#!/usr/bin/env python3
"""Print every PromQL expression of the alerting rules, one per line.

Multi-line expressions are joined into one line, so that each line can be sent
as is to Prometheus' query API. With --names, each line is
`alert name<TAB>expression`.

    python3 tests/deploy/rule_exprs.py [--names] [RULES.yml]
"""

import argparse
import pathlib
import sys

import yaml

DEFAULT = (
    pathlib.Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
)


def rules(document):
    """Yield (alert or record name, expression) for every rule."""
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            yield rule.get("alert") or rule.get("record"), str(rule["expr"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rules", nargs="?", default=str(DEFAULT))
    parser.add_argument(
        "--names", action="store_true", help="prefix each line with the rule's name"
    )
    args = parser.parse_args()

    document = yaml.safe_load(pathlib.Path(args.rules).read_text(encoding="utf-8"))
    for name, expr in rules(document):
        line = " ".join(expr.split())
        print(f"{name}\t{line}" if args.names else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
