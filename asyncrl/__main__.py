import sys

from asyncrl.cli.main import main

sys.exit(main())
