"""Decode speed of the embedded SmolLM2 on this machine: flashserve vs transformers' generate.

Same as ``flashserve bench cpu-decode``; kept here so the benchmark is a plain script too:
    python benchmarks/cpu_decode.py --new-tokens 128 --repeats 3
"""

import argparse
import sys

from flashserve.bench import cpu_decode

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu_decode.add_arguments(parser)
    sys.exit(cpu_decode.run(parser.parse_args()))
