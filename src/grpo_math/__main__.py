"""``python -m grpo_math …`` is ``grpo-math …`` (so ``torchrun -m grpo_math train …`` works)."""

import sys

from .cli import main

sys.exit(main())
