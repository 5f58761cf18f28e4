"""`python -m cli ...` is the same as `iat ...` (used where the script is not on PATH)."""
import sys

from cli import main

sys.exit(main())
