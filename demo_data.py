#!/usr/bin/env python3
"""Built-in demo data set: one street seen by day and by night, made offline in seconds.

    python demo_data.py demo_data/            # the route run_experiment.py --demo uses

What the pictures and CSVs hold: vprkit/tables/demo_route.py (generate_demo_dataset).
"""
from __future__ import annotations

from typing import Sequence

from vprkit.cli import CliParser, run_cli
from vprkit.cli.configs import DemoDataConfig
from vprkit.cli.settings import config_parser, parse_config
from vprkit.tables.demo_route import DemoDataset, generate_demo_dataset


def build_parser() -> CliParser:
    return config_parser(DemoDataConfig, __doc__.split("\n")[0], config_file=False)


def main(argv: Sequence[str] | None = None) -> DemoDataset:
    args = parse_config(build_parser(), DemoDataConfig, argv, layered=False)
    data = generate_demo_dataset(args.out_dir, seed=args.seed, num_places=args.num_places, spacing_m=args.spacing_m,
                                 force=args.force, progress=print)
    state = "generated" if data.generated else "already there"
    print(f"{data.root}: {state}; " + ", ".join(f"{split} {n} images" for split, n in data.counts.items()))
    return data


if __name__ == "__main__":
    run_cli(main)
