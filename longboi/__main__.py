import sys

from longboi.cli import main

sys.exit(main())
