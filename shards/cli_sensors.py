"""``gfm sensors [NAME]``: list sensor presets, or one preset's band table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gfm.sensors import SensorError, format_sensor_table, get_sensor, load_sensors_yaml, sensors


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gfm sensors``: list the registered sensors, or print one sensor's band table."""
    p = argparse.ArgumentParser(prog="gfm sensors", description="List sensor presets and their band tables.")
    p.add_argument("name", nargs="?", help="a sensor name: print its band table")
    p.add_argument("--yaml", help="register user sensors from this YAML file first")
    a = p.parse_args(argv)
    try:
        if a.yaml:
            load_sensors_yaml(a.yaml)
        if a.name:
            print(format_sensor_table(get_sensor(a.name)))
            return 0
    except SensorError as e:
        print(f"gfm sensors: error: {e}", file=sys.stderr)
        return 2
    for name, s in sensors().items():
        print(f"{name:<15} {len(s.bands):>3} bands  {s.description}")
    return 0
