#!/usr/bin/env python3
"""Run Tollgate: `python run.py [--config FILE] [--check] [--no-mock]`."""

import sys

from proxy.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
