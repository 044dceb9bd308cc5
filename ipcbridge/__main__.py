import sys

from ipcbridge.cli import main

sys.exit(main())
