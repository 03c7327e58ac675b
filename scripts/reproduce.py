#!/usr/bin/env python
"""Reproduce the published CIFAR-100 distillation tables with kdrun (see the README section "Reproducing the published CIFAR-100 tables").

    python scripts/reproduce.py --pairs r56_r20,r32x4_r8x4 --methods kd,crd,dkd --seeds 0,1,2
    python scripts/reproduce.py --help
"""

import sys

from kdrun.reproduce import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
