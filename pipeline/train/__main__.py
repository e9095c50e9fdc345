"""`python -m pipeline.train CONFIG ...`: what the `deepspeed` launcher runs on each rank."""

import argparse
import sys

from pipeline.config import ConfigError
from pipeline.train.launch import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m pipeline.train")
add_arguments(parser)
try:
    sys.exit(main(parser.parse_args()))
except ConfigError as e:
    print(f"simvlg: config error: {e}", file=sys.stderr)
    sys.exit(1)
