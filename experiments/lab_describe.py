"""Describe a lab: its size, entropy H and the cost of its exact functions (docs/lab.md, "The default instance").

    python experiments/lab_describe.py lab --L 128 --n 1000
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from tinydiff.lab.evaluate import describe  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("spec", nargs="?", default="lab", help="lab or lab:W=256,delta=0.02,...")
p.add_argument("--L", type=int, default=128, help="sequence length")
p.add_argument("--n", type=int, default=1000, help="sequences per timed call")
p.add_argument("--draws", type=int, default=2048, help="windows for the entropy estimate")
a = p.parse_args()
print(json.dumps(describe(a.spec, a.L, a.n, a.draws)))
