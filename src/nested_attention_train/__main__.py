"""`python -m nested_attention_train` / `accelerate launch -m nested_attention_train`."""

import sys

from .trainer import main

sys.exit(main())
