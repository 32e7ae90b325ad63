import sys

from smalltalk.cli import main

sys.exit(main())
