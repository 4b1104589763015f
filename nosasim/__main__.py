import sys

from nosasim.cli import main

sys.exit(main())
