"""Entry point: ``python main.py train-neurogym|eval|render|resume ...`` (see ``--help``)."""
import sys

from mpn_dqn.driver.cli.parser import main

if __name__ == "__main__":
    sys.exit(main())
