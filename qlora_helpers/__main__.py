import sys

from qlora_helpers.cli import main

sys.exit(main())
