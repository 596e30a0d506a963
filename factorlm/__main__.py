import sys

from factorlm.cli import main

sys.exit(main())
